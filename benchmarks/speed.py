"""Speed of both stages on the real code paths, written as one JSON object.

Stage one: `stages.cache_teacher.run` (decode, crop, teacher forward, Zarr writes) on a Fashion-MNIST slice:
wall time, start-up (until the first batch reaches the teacher), steady views/s, and the wall time of a
rerun on the finished store (verify, exit: no teacher built). Against it, a bare teacher forward over random
tensors in the same batch size, per precision, with its model FLOP utilisation (FLOPs of one view from
torch.utils.flop_counter, over the device's dense bf16 peak). On CUDA, also an ImageNet-sized source made
here (JPEGs at 500x375, quality 90, upscaled from Fashion-MNIST): decode and render cost per image per core,
the loader alone through data.num_workers workers, and stage one on it; then the same with `teacher.render:
device` (the workers only decode; the loader alone, the device's render alone, stage one).

Stage two: images/s and steps/s of CE-only training, DHO from the cache, DHO with the online teacher on the
same views (`teacher.mode=online`, `teacher.online_views=cached`) and, on CUDA, cached DHO with
`train.compile`, all through `stages.train_student.run`, read from metrics.jsonl with the first log interval
(warm-up) dropped.

The teacher is a random-init open_clip model saved to a file and loaded through open_clip's file path.
On the CPU (defaults: ViT-B-32 teacher, resnet10t student at 32 px, a 400-image slice) compare ratios:
these machines are noisy. On CUDA (defaults: ViT-L-14 teacher, resnet50 student at 224 px, bf16,
channels_last, 64 + 64 images a step) the numbers are absolute. Each section is written to --out as soon
as it is measured, so a run cut short keeps what it measured.

    python benchmarks/speed.py                      # CPU: writes benchmarks/speed.json
    python benchmarks/speed.py --device cuda --out benchmarks/speed-cuda.json
    python benchmarks/speed.py --device cuda --steps 300 --skip teacher_forward --skip stage_one_jpeg  # stage two
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np
import open_clip
import torch
import yaml
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from dho_pipeline.config import load_config
from dho_pipeline.data.samples import parse_sample
from dho_pipeline.data.shards import iter_shard, load_manifest, write_shards
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource, ImageFolderSource
from dho_pipeline.data.splits import split_source
from dho_pipeline.data.teacher_views import TeacherViewBatches, views_on
from dho_pipeline.data.views import render_view, view_params
from dho_pipeline.store.lookup import view_recipe
from dho_pipeline.teacher.open_clip_teacher import TEACHER_DTYPES, load_teacher, register_model_configs
from stages import cache_teacher, train_student

LOG_EVERY = 5
DEFAULTS = {  # per device: teacher, student, student px, images per class in the slice, steps, batch, workers
    "cpu": {"teacher": "ViT-B-32", "student": "resnet10t", "image_size": 32, "per_class": 30, "steps": 25,
            "batch": 32, "views": 4, "workers": 1},
    "cuda": {"teacher": "ViT-L-14", "student": "resnet50", "image_size": 224, "per_class": 400, "steps": 60,
             "batch": 64, "views": 8, "workers": max(1, min(14, (os.cpu_count() or 2) - 2))},
}
OPTIONAL_SECTIONS = ("teacher_forward", "stage_one_jpeg", "stage_two")
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
JPEG_SIZE, JPEG_QUALITY, JPEG_GRAIN = (500, 375), 90, 8.0


class Results(dict):
    """The JSON object, rewritten to `path` after every section."""

    def __init__(self, path: Path, **fields):
        super().__init__(**fields)
        self.path = path

    def record(self, section: str, measure: Callable[[], object]) -> None:
        """Measure one section; an error is recorded in its place and the run goes on."""
        tick = time.perf_counter()
        try:
            self[section] = measure()
        except Exception as e:  # a benchmark reports what failed and measures the rest
            self[section] = {"error": f"{type(e).__name__}: {e}"}
        click.echo(f"[speed] {section}: {time.perf_counter() - tick:.1f} s", err=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self, indent=1) + "\n")


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--teacher", "teacher_model", default=None, help="open_clip model (ViT-B-32 on cpu, ViT-L-14 on cuda).")
@click.option("--student", default=None, help="timm model (resnet10t on cpu, resnet50 on cuda).")
@click.option("--image-size", type=int, default=None, help="Student input size (32 on cpu, 224 on cuda).")
@click.option("--steps", type=int, default=None, help="Training steps per stage-two run (25 on cpu, 60 on cuda).")
@click.option("--jpegs", type=int, default=None,
              help="Images in the 500x375 JPEG source [2000 on cuda; 0 (skipped) on cpu].")
@click.option("--fmnist", type=click.Path(file_okay=False, exists=True, path_type=Path), default=FASHION_MNIST_DIR,
              show_default=True, help="Fashion-MNIST idx folder (a copy of part of it will do).")
@click.option("--skip", multiple=True, type=click.Choice(OPTIONAL_SECTIONS),
              help="Leave a section out (repeat the flag); stage one always runs: stage two reads its store.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON output [benchmarks/speed.json on cpu, benchmarks/speed-cuda.json on cuda].")
def main(device: str, teacher_model: str | None, student: str | None, image_size: int | None, steps: int | None,
         jpegs: int | None, fmnist: Path, skip: tuple[str, ...], out: Path | None) -> None:
    settings = dict(DEFAULTS[device])
    settings.update({k: v for k, v in (("teacher", teacher_model), ("student", student), ("image_size", image_size),
                                       ("steps", steps)) if v is not None})
    out = out or Path("benchmarks/speed.json" if device == "cpu" else "benchmarks/speed-cuda.json")
    with tempfile.TemporaryDirectory(prefix="dho-speed-") as work:
        jpegs = (2000 if device == "cuda" else 0) if jpegs is None else jpegs
        results = measure(Path(work), device, settings, IdxSource(fmnist), jpegs, set(skip), out)
    click.echo(json.dumps(results, indent=1))


def measure(work: Path, device: str, s: dict, source: IdxSource, jpegs: int, skip: set[str], out: Path) -> Results:
    """Build the slice, the teacher file and the config under `work`; time both stages there."""
    results = Results(out, device=device_name(device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                      threads=torch.get_num_threads(), teacher=s["teacher"],
                      student=f"{s['student']}@{s['image_size']}px", settings=s)
    torch.manual_seed(0)
    teacher_file = save_random_teacher(work, s["teacher"])
    splits = split_source(source, shots=4, val_per_class=5, test_per_class=5, max_train_per_class=s["per_class"],
                          seed=1)
    config = write_config(work, write_shards(source, splits, work / "shards", shard_size=256).root, teacher_file, s,
                          device)
    cfg = load_config(config)
    names = load_manifest(cfg.location(cfg.data.shards)).class_names

    results.record("stage_one", lambda: stage_one(config))
    sections = {"teacher_forward": lambda: bare_forward(config, names, device),
                "stage_one_jpeg": lambda: jpeg_stage_one(work, config, source, jpegs),
                "stage_two": lambda: stage_two(work, config, s, device)}
    for section, run in sections.items():
        if section not in skip and (jpegs or section != "stage_one_jpeg"):
            results.record(section, run)
    results.record("ratios", lambda: ratios(results))
    return results


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def save_random_teacher(work: Path, model: str) -> Path:
    register_model_configs()
    path = work / f"{model}.pt"
    torch.save(open_clip.create_model(model).state_dict(), path)
    return path


def write_config(work: Path, shards: Path, teacher_file: Path, s: dict, device: str) -> Path:
    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"shards": str(shards), "num_workers": s["workers"]},
        "teacher": {"model": s["teacher"], "pretrained": str(teacher_file), "templates": "fashion-mnist",
                    "batch_size": 256 if device == "cuda" else 32},
        "views": {"count": s["views"]},
        "cache": {"root": str(work / "cache")},
        "student": {"model": s["student"], "image_size": s["image_size"]},
        "train": {"steps": s["steps"], "log_every": LOG_EVERY, "checkpoint_every": s["steps"],
                  "batch_labelled": s["batch"], "batch_unlabelled": s["batch"], "device": device,
                  "channels_last": device == "cuda"},
    }))
    return config


def stage_one(config: Path, overrides: tuple[str, ...] = ()) -> dict:
    """A fresh store, then the same command again on the finished store."""
    first = cache_teacher.run(load_config(config, list(overrides)))
    again = cache_teacher.run(load_config(config, list(overrides)))
    assert again.already_complete
    return {"views": first.views, "wall_s": first.seconds, "startup_s": first.startup_s,
            "startup_views": first.startup_views,
            "steady_views_per_s": first.steady_views_per_s, "rerun_finished_store_s": again.seconds}


def bare_forward(config: Path, class_names: list[str], device: str) -> dict:
    """Views/s of the teacher's forward alone on random tensors, per precision, and its FLOP utilisation.

    fp32_autocast_bf16 is how stage one ran before teacher.dtype: fp32 weights under bf16 autocast; bf16 is what
    teacher.dtype: auto runs on CUDA.
    """
    cfg = load_config(config, ["teacher.dtype=fp32"])
    teacher = load_teacher(cfg.teacher, class_names, torch.device(device), cfg.base_dir)
    size, batch = teacher.image_size, cfg.teacher.batch_size
    images = torch.randn(2 * batch, 3, size, size, device=device)
    flops = flops_per_view(teacher, images[:1])
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in device_name(device)), None)
    variants = {"fp32": ("fp32", False, batch)}
    if device == "cuda":
        variants |= {"fp32_autocast_bf16": ("fp32", True, batch), "bf16": ("bf16", False, batch),
                     "bf16_batch_512": ("bf16", False, 2 * batch), "fp16": ("fp16", False, batch)}
    result: dict = {"batch_size": batch, "gflops_per_view": flops / 1e9, "peak_bf16_tflops": peak}
    for name, (dtype, autocast, n) in variants.items():
        teacher.model.to(TEACHER_DTYPES[dtype])
        teacher.dtype = TEACHER_DTYPES[dtype]
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            rate = views_per_s(lambda n=n: teacher.logits(images[:n]), n, device)
        result[name] = {"views_per_s": rate, "mfu": rate * flops / (peak * 1e12) if peak else None}
    if device == "cuda":  # torch.compile on the bf16 tower (compile time not counted)
        teacher.model.to(torch.bfloat16)
        teacher.dtype, teacher.model = torch.bfloat16, torch.compile(teacher.model)
        rate = views_per_s(lambda: teacher.logits(images[:batch]), batch, device)
        result["bf16_compiled"] = {"views_per_s": rate, "mfu": rate * flops / (peak * 1e12) if peak else None}
    return result


def flops_per_view(teacher, image: torch.Tensor) -> int:
    """Model FLOPs of one view (see counted_flops)."""
    return counted_flops(teacher, image).get_total_flops()


def counted_flops(teacher, image: torch.Tensor) -> FlopCounterMode:
    """The FLOP counter over one forward of `image`: nn.MultiheadAttention's fused fast path off and attention in
    plain matmuls, which torch.utils.flop_counter counts (it misses the fused kernels)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            teacher.logits(image)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter


def views_per_s(forward: Callable[[], torch.Tensor], views: int, device: str, seconds: float = 4.0) -> float:
    """Calls of `forward` (each `views` views) queued for about `seconds` after two warm-up calls, until done."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    forward(), forward()
    sync()
    calls, tick = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - tick < seconds:
        forward()
        calls += 1
    sync()
    return calls * views / (time.perf_counter() - tick)


def jpeg_stage_one(work: Path, config: Path, fmnist: IdxSource, count: int) -> dict:
    """An ImageNet-sized source: decode and render cost per core, the loader alone, stage one on it."""
    source = make_jpeg_source(fmnist, work / "jpeg-source", count)
    splits = split_source(source, shots=4, val_per_class=2, test_per_class=2, seed=1)
    shards = write_shards(source, splits, work / "jpeg-shards", shard_size=250)
    overrides = (f"data.shards={shards.root}", f"cache.root={work / 'jpeg-cache'}")
    cfg = load_config(config, list(overrides))
    sizes = [f.stat().st_size for f in (work / "jpeg-source").rglob("*.jpg")]
    result = {"images": count, "jpeg_kib": float(np.mean(sizes)) / 1024,
              **render_cost(shards.shards(), cfg), "loader_only": loader_only(shards.shards(), cfg),
              **stage_one(config, overrides)}
    on_device = (f"data.shards={shards.root}", f"cache.root={work / 'jpeg-cache-render-on-device'}",
                 "teacher.render=device")
    try:
        result["render_on_device"] = {"loader_only": loader_only(shards.shards(), cfg, on_device=True),
                                      "render_only": device_render_only(shards.shards(), cfg),
                                      **stage_one(config, on_device)}
    except Exception as e:  # the workers' numbers above stay
        result["render_on_device"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def make_jpeg_source(fmnist: IdxSource, root: Path, count: int) -> ImageFolderSource:
    """`count` Fashion-MNIST training images as 500x375 RGB JPEGs (quality 90), one folder per class."""
    jobs = [(root / fmnist.class_names[label] / f"{i:05d}.jpg", fmnist.images["train"][i])
            for i, label in enumerate(fmnist.labels["train"][:count])]
    for name in fmnist.class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=32))
    return ImageFolderSource(root)


def _write_jpeg(job: tuple[Path, np.ndarray]) -> None:
    """Upscaled, tinted and with sensor-like grain, so the file size (about 43 KB) and decode cost are a photo's."""
    path, pixels = job
    gray = np.asarray(Image.fromarray(pixels).resize(JPEG_SIZE, Image.BICUBIC), np.float32)
    rgb = np.stack([gray, 0.9 * gray, 0.75 * gray], axis=-1)
    rgb += np.random.default_rng(int(path.stem)).normal(0.0, JPEG_GRAIN, rgb.shape)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=JPEG_QUALITY)


def render_cost(shards: list, cfg) -> dict:
    """One core: ms to decode an image, ms to crop and resize one view to the teacher's size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raws = list(iter_shard(shards[0]))[:100]
        tick = time.perf_counter()
        samples = [parse_sample(raw, shards[0], i, skip_bad=False) for i, raw in enumerate(raws)]
        decode = (time.perf_counter() - tick) / len(samples)
        recipe, size = view_recipe(cfg), load_teacher_size(cfg)
        tick = time.perf_counter()
        for sample in samples:
            _, height, width = sample.image.shape
            for view in range(1 + recipe.count):
                box, flip = view_params(recipe, sample.row, view, width, height)
                render_view(sample.image, box, flip, size)
        render = (time.perf_counter() - tick) / (len(samples) * (1 + recipe.count))
    finally:
        torch.set_num_threads(threads)
    return {"decode_ms_per_image_per_core": decode * 1e3, "render_ms_per_view_per_core": render * 1e3}


def load_teacher_size(cfg) -> int:
    vision = open_clip.get_model_config(cfg.teacher.model)["vision_cfg"]
    return int(cfg.teacher.image_size or vision["image_size"])


def loader_only(shards: list, cfg, on_device: bool = False) -> dict:
    """Stage one's CPU side alone: TeacherViewBatches through data.num_workers workers, nothing on the device
    (`on_device`: the decode-only batches of teacher.render: device)."""
    dataset = TeacherViewBatches(shards, view_recipe(cfg), load_teacher_size(cfg), cfg.teacher.batch_size,
                                 render_on_device=on_device)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(cfg.data.num_workers, len(shards)),
                        pin_memory=torch.cuda.is_available())
    tick, views = time.perf_counter(), 0
    for batch in loader:
        views += batch["flips"].shape[0] * batch["flips"].shape[1]
    return {"workers": cfg.data.num_workers, "views_per_s": views / (time.perf_counter() - tick)}


def device_render_only(shards: list, cfg) -> dict:
    """Views/s of teacher.render: device's crops alone on the device: the first shard's batches, loaded first."""
    dataset = TeacherViewBatches(shards[:1], view_recipe(cfg), load_teacher_size(cfg), cfg.teacher.batch_size,
                                 render_on_device=True)
    device, size = torch.device(cfg.train.device), load_teacher_size(cfg)
    batches = [{**batch, "sources": batch["sources"].to(device)} for batch in DataLoader(dataset, batch_size=None)]
    views = sum(batch["flips"].shape[0] * batch["flips"].shape[1] for batch in batches)
    rate = views_per_s(lambda: [views_on(batch, device, size) for batch in batches], views, device.type)
    return {"batches": len(batches), "views_per_s": rate}


def stage_two(work: Path, config: Path, s: dict, device: str) -> dict:
    runs = {"ce_only": (["train.method=ce_only"], s["batch"]),
            "dho_cached": (["train.method=dho"], 2 * s["batch"]),
            "dho_online": (["train.method=dho", "teacher.mode=online", "teacher.online_views=cached"], 2 * s["batch"])}
    if device == "cuda":
        runs["dho_cached_compiled"] = (["train.method=dho", "train.compile=true"], 2 * s["batch"])
    measured = {}
    for name, (overrides, per_step) in runs.items():
        run_dir = work / "runs" / name
        tick = time.perf_counter()
        train_student.run(load_config(config, [*overrides, f"train.out_dir={run_dir}"]))
        measured[name] = {**throughput(run_dir / "metrics.jsonl", per_step), "wall_s": time.perf_counter() - tick}
    return measured


def throughput(metrics: Path, images_per_step: int) -> dict[str, float]:
    """Mean images/s over the log intervals after the first, and the steps/s it implies."""
    rates = [r["images_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "images_per_s" in r]
    images_per_s = float(np.mean(rates[1:]))
    return {"images_per_s": images_per_s, "steps_per_s": images_per_s / images_per_step}


def ratios(results: dict) -> dict:
    """The ratios the measured sections allow."""
    found = {}
    bare = results.get("teacher_forward", {})
    default = "bf16" if "bf16" in bare else "fp32"  # what teacher.dtype: auto runs on this device
    if default in bare:
        rate = bare[default]["views_per_s"]
        found["stage_one_steady_vs_bare_forward"] = results["stage_one"]["steady_views_per_s"] / rate
        jpeg = results.get("stage_one_jpeg", {})
        if "steady_views_per_s" in jpeg:
            found["jpeg_stage_one_steady_vs_bare_forward"] = jpeg["steady_views_per_s"] / rate
        if "steady_views_per_s" in jpeg.get("render_on_device", {}):
            found["jpeg_render_on_device_steady_vs_bare_forward"] = (jpeg["render_on_device"]["steady_views_per_s"]
                                                                      / rate)
    if "dho_cached" in results.get("stage_two", {}):
        two = results["stage_two"]
        found |= {
            "dho_cached_vs_ce_only_images_per_s": two["dho_cached"]["images_per_s"] / two["ce_only"]["images_per_s"],
            "dho_cached_vs_ce_only_steps_per_s": two["dho_cached"]["steps_per_s"] / two["ce_only"]["steps_per_s"],
            "dho_cached_vs_online_steps_per_s": two["dho_cached"]["steps_per_s"] / two["dho_online"]["steps_per_s"],
        }
    return found


if __name__ == "__main__":
    main()
