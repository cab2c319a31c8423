"""Where the bare teacher forward loses its FLOP utilisation: the same bf16 image tower through each attention path.

open_clip's towers use nn.MultiheadAttention: in eval mode without autocast torch takes its fused fast path;
with the fast path off, attention runs through F.scaled_dot_product_attention, whose kernel can be pinned.
Prints one JSON object: views/s and MFU per path (FLOPs counted as in benchmarks/speed.py).

    python benchmarks/teacher_attention.py [--model ViT-L-14] [--batch 256]
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
import open_clip
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from speed import PEAK_BF16_TFLOPS, flops_per_view, views_per_s  # noqa: E402

from dho_pipeline.teacher.open_clip_teacher import Teacher  # noqa: E402

PATHS = {
    "mha_fast_path": (True, None),
    "sdpa_default": (False, None),
    "sdpa_flash": (False, SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": (False, SDPBackend.CUDNN_ATTENTION),
    "sdpa_efficient": (False, SDPBackend.EFFICIENT_ATTENTION),
}


@click.command()
@click.option("--model", default="ViT-L-14", show_default=True)
@click.option("--batch", default=256, show_default=True)
def main(model: str, batch: int) -> None:
    tower = open_clip.create_model(model, device="cuda").visual.eval().to(torch.bfloat16)
    teacher = Teacher(tower, torch.randn(tower.output_dim, 10, device="cuda"), 224, (0.0,) * 3, (1.0,) * 3, {},
                      torch.bfloat16)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    flops = flops_per_view(teacher, images[:1])
    peak = next(t for name, t in PEAK_BF16_TFLOPS.items() if name in torch.cuda.get_device_name())
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": model, "batch": batch}
    for name, (fast_path, backend) in PATHS.items():
        torch.backends.mha.set_fastpath_enabled(fast_path)
        try:
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                rate = views_per_s(lambda: teacher.logits(images), batch, "cuda", seconds=3.0)
            result[name] = {"views_per_s": rate, "mfu": rate * flops / (peak * 1e12)}
        except RuntimeError as e:  # a kernel this device or build lacks
            result[name] = {"error": str(e).splitlines()[0]}
    click.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
