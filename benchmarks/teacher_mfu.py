"""Where the bare teacher forward loses its FLOP utilisation, and what wins it back: the bf16 image tower through
each attention path, under torch.compile per mode, and a kernel-time profile of the path stage one runs.

open_clip's towers use nn.MultiheadAttention: in eval mode without autocast torch takes its fused fast path;
with the fast path off, attention runs through F.scaled_dot_product_attention, whose kernel can be pinned.
torch.compile's max-autotune modes may fuse the bias, GELU, LayerNorm and residual work into the matmuls; each
mode is measured with the fast path off (attention as plain ops inductor can see) and on.
A variant moves each MLP's bias and GELU into its first matmul's epilogue (eager, no compiler).
The profile splits one eager forward's device time into matmuls, attention and the memory-bound rest, with
the matmuls' own TFLOP/s, so the gap to the 50% target has a named owner.

Prints one JSON object, also written to --out after every section (a run cut short keeps what it measured):
views/s and MFU per path (FLOPs counted as in benchmarks/speed.py), compile seconds, the profile.

    python benchmarks/teacher_mfu.py [--model ViT-L-14] [--batch 256] [--out benchmarks/teacher-mfu-cuda.json]
    python benchmarks/teacher_mfu.py --device cpu --model dho-tiny-clip --batch 8 --seconds 0.5 \
        --compile default --out /tmp/mfu.json           # a smoke run of the script itself
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import open_clip
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from speed import PEAK_BF16_TFLOPS, counted_flops, flops_per_view, views_per_s  # noqa: E402

from dho_pipeline.teacher.open_clip_teacher import Teacher, register_model_configs  # noqa: E402

ATTENTION_PATHS = {
    "mha_fast_path": (True, None),
    "sdpa_default": (False, None),
    "sdpa_flash": (False, SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": (False, SDPBackend.CUDNN_ATTENTION),
    "sdpa_efficient": (False, SDPBackend.EFFICIENT_ATTENTION),
}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
KERNEL_KINDS = {  # substrings of device kernel names, checked in this order; the rest is "other"
    "attention": ("flash", "fmha", "attention", "sdpa", "softmax"),
    "matmul": ("gemm", "matmul", "conv", "cutlass", "xmma", "nvjet", "mm_", "_mm", "addmm", "triton_tem"),
    "norm_and_elementwise": ("layer_norm", "norm", "elementwise", "gelu", "add", "vectorized", "triton_poi",
                             "triton_per", "triton_red", "copy", "cat"),
}


@click.command()
@click.option("--model", default="ViT-L-14", show_default=True, help="open_clip model, random-init.")
@click.option("--batch", default=256, show_default=True, help="Views per forward.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--seconds", default=3.0, show_default=True, help="Timed seconds per path, after two warm-up calls.")
@click.option("--compile", "modes", multiple=True, type=click.Choice(COMPILE_MODES), default=COMPILE_MODES,
              show_default=True, help="torch.compile modes to measure (repeat the flag).")
@click.option("--attention/--no-attention", default=True, show_default=True,
              help="Measure each eager attention path.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks/teacher-mfu-cuda.json"), show_default=True)
def main(model: str, batch: int, device: str, seconds: float, modes: tuple[str, ...], attention: bool,
         out: Path) -> None:
    register_model_configs()
    tower = open_clip.create_model(model, device=device).visual.eval().to(torch.bfloat16)
    size = tower.image_size[0] if isinstance(tower.image_size, tuple) else tower.image_size
    teacher = Teacher(tower, torch.randn(tower.output_dim, 10, device=device), size, (0.0,) * 3, (1.0,) * 3, {},
                      torch.bfloat16)
    images = torch.randn(batch, 3, size, size, device=device)
    flops = flops_per_view(teacher, images[:1])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((t for key, t in PEAK_BF16_TFLOPS.items() if key in name), None)
    result = {"device": name, "torch": torch.__version__, "open_clip": open_clip.__version__, "model": model,
              "batch": batch, "gflops_per_view": flops / 1e9, "peak_bf16_tflops": peak,
              "date": time.strftime("%Y-%m-%d")}

    def record(section: str, measure: Callable[[], dict]) -> None:
        try:
            result[section] = measure()
        except Exception as e:  # a kernel or compile mode this device or build lacks: report it, go on
            result[section] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        click.echo(f"[teacher_mfu] {section}: {json.dumps(result[section])}", err=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    def rate(forward: Callable[[], torch.Tensor]) -> dict:
        views = views_per_s(forward, batch, device, seconds=seconds)
        return {"views_per_s": views, "mfu": views * flops / (peak * 1e12) if peak else None}

    record("eager_profile", lambda: kernel_profile(teacher, images, flops, device))
    for path, (fast_path, backend) in ATTENTION_PATHS.items() if attention else ():
        record(path, lambda fast_path=fast_path, backend=backend: with_attention(
            fast_path, backend, lambda: rate(lambda: teacher.logits(images))))
    record("mha_fast_path_gelu_epilogue", lambda: gelu_epilogue(teacher, images, rate))
    for mode in modes:  # the fast path's fused attention is opaque to inductor; without it the block is plain ops
        for fast_path, suffix in ((False, "sdpa"), (True, "mha_fast_path")):
            record(f"compiled_{mode}_{suffix}", lambda mode=mode, fast_path=fast_path: with_attention(
                fast_path, None, lambda: compiled(teacher, images, mode, rate)))
    click.echo(json.dumps(result, indent=1))


def with_attention(fast_path: bool, backend: SDPBackend | None, measure: Callable[[], dict]) -> dict:
    """`measure` with nn.MultiheadAttention's fast path on or off and, when given, one SDPA kernel pinned."""
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        with sdpa_kernel(backend) if backend else contextlib.nullcontext():
            return measure()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


class GeluEpilogueMlp(torch.nn.Module):
    """A block's c_fc -> GELU -> c_proj with c_fc's bias and GELU in its matmul's epilogue (cuBLASLt on CUDA).

    The epilogue computes GELU's tanh form, where open_clip's nn.GELU is the erf form.
    """

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.c_fc, self.c_proj = mlp.c_fc, mlp.c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        hidden = torch._addmm_activation(self.c_fc.bias, flat, self.c_fc.weight.t(), use_gelu=True)
        return F.linear(hidden, self.c_proj.weight, self.c_proj.bias).view(*x.shape[:-1], -1)


def gelu_epilogue(teacher: Teacher, images: torch.Tensor, rate: Callable) -> dict:
    """The eager tower with every block's MLP as GeluEpilogueMlp: views/s, MFU and how far its logits move."""
    blocks = teacher.model.transformer.resblocks
    saved = [block.mlp for block in blocks]
    reference = teacher.logits(images)
    try:
        for block in blocks:
            block.mlp = GeluEpilogueMlp(block.mlp)
        fused = teacher.logits(images)
        return {**rate(lambda: teacher.logits(images)),
                "max_logit_diff": (fused - reference).abs().max().item(),
                "top1_agreement": (fused.argmax(1) == reference.argmax(1)).float().mean().item()}
    finally:
        for block, mlp in zip(blocks, saved, strict=True):
            block.mlp = mlp


def compiled(teacher: Teacher, images: torch.Tensor, mode: str, rate: Callable) -> dict:
    """The tower under torch.compile(mode): seconds to the first two outputs, then views/s and MFU."""
    torch._dynamo.reset()
    tower = torch.compile(teacher.model, mode=mode)
    fast = Teacher(tower, teacher.classifier, teacher.image_size, teacher.mean, teacher.std, {}, teacher.dtype)
    tick = time.perf_counter()
    fast.logits(images), fast.logits(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return {"compile_s": time.perf_counter() - tick, **rate(lambda: fast.logits(images))}


def kernel_profile(teacher: Teacher, images: torch.Tensor, flops: int, device: str) -> dict:
    """Device time of three eager forwards by kernel kind, and the matmuls' TFLOP/s from the counted FLOPs."""
    teacher.logits(images)
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(3):
            teacher.logits(images)
        if device == "cuda":
            torch.cuda.synchronize()
    times: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if us <= 0 or (device == "cpu" and not event.key.startswith("aten::")):
            continue
        kind = next((k for k, keys in KERNEL_KINDS.items() if any(s in event.key.lower() for s in keys)), "other")
        times[kind] = times.get(kind, 0.0) + us / 3
        top.append((us / 3, kind, event.key[:120]))
    total = sum(times.values())
    matmul_flops = flops * images.shape[0] * matmul_share(teacher, images[:1])
    return {
        "ms_per_forward": total / 1e3,
        "share": {k: v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])},
        "matmul_tflops": matmul_flops / (times["matmul"] * 1e-6) / 1e12 if times.get("matmul") else None,
        "top_kernels": [{"ms": us / 1e3, "kind": kind, "name": key} for us, kind, key in sorted(top)[::-1][:12]],
    }


def matmul_share(teacher: Teacher, image: torch.Tensor) -> float:
    """Fraction of the counted FLOPs that are linear layers and the patch convolution (not attention)."""
    counter = counted_flops(teacher, image)
    by_op = counter.get_flop_counts()["Global"]
    linear = sum(n for op, n in by_op.items() if str(op).split(".")[-1] in ("addmm", "mm", "convolution"))
    return linear / counter.get_total_flops()


if __name__ == "__main__":
    main()
