"""Speed ratios, measured in one run on the real code paths (these machines are noisy: compare ratios).

* Stage two: images/s and steps/s of CE-only training, DHO from the cache, and DHO with the online teacher
  on the same views (`teacher.mode=online`, `teacher.online_views=cached`), all through
  `stages.train_student.run`, read from each run's metrics.jsonl with the first log interval (warm-up) dropped.
* Stage one: teacher views/s of `stages.cache_teacher.run` (decode, crop, forward, Zarr writes) against a
  bare `teacher.logits` forward over as many random tensors in batches of the same size.

The teacher is a random-init open_clip model saved to a file and loaded through open_clip's file path
(ViT-B-32 at 224 px by default: a real teacher dwarfs the student, which is what the cache saves); the
student is timm resnet10t at 32 px. Usage:

    python benchmarks/speed.py [--teacher ViT-B-32] [--steps 25] [--out benchmarks/speed.json]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import open_clip
import torch
import yaml

from dho_pipeline.config import load_config
from dho_pipeline.shards import load_manifest, write_shards
from dho_pipeline.sources import FASHION_MNIST_DIR, IdxSource
from dho_pipeline.splits import split_source
from dho_pipeline.teacher import load_teacher
from stages import cache_teacher, train_student

LOG_EVERY = 5


def throughput(metrics: Path, images_per_step: int) -> dict[str, float]:
    """Mean images/s over the log intervals after the first, and the steps/s it implies."""
    rates = [r["images_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "images_per_s" in r]
    images_per_s = float(np.mean(rates[1:]))
    return {"images_per_s": images_per_s, "steps_per_s": images_per_s / images_per_step}


def bare_forward(cfg, class_names: list[str], count: int) -> float:
    """Views/s of the teacher alone: `count` random normalised images in batches of teacher.batch_size."""
    teacher = load_teacher(cfg.teacher, class_names, torch.device("cpu"), cfg.base_dir)
    size, batch = teacher.image_size, cfg.teacher.batch_size
    images = torch.randn(batch, 3, size, size)
    teacher.logits(images[:2])  # warm-up
    tick = time.perf_counter()
    for start in range(0, count, batch):
        teacher.logits(images[: min(batch, count - start)])
    return count / (time.perf_counter() - tick)


@click.command()
@click.option("--teacher", "teacher_model", default="ViT-B-32", show_default=True, help="open_clip model name.")
@click.option("--steps", default=25, show_default=True, help="Training steps per stage-two run.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("benchmarks/speed.json"),
              show_default=True)
def main(teacher_model: str, steps: int, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="dho-speed-") as work:
        result = measure(Path(work), teacher_model, steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(json.dumps(result, indent=1))


def measure(work: Path, teacher_model: str, steps: int) -> dict:
    """Build the slice, the teacher file and the config under `work`; time both stages there."""
    torch.manual_seed(0)
    source = IdxSource(FASHION_MNIST_DIR)
    splits = split_source(source, shots=4, val_per_class=5, test_per_class=5, max_train_per_class=30, seed=1)
    write_shards(source, splits, work / "shards", shard_size=64)
    teacher_file = work / f"{teacher_model}.pt"
    torch.save(open_clip.create_model(teacher_model).state_dict(), teacher_file)
    batch = {"labelled": 32, "unlabelled": 32}
    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"shards": str(work / "shards"), "num_workers": 1},
        "teacher": {"model": teacher_model, "pretrained": str(teacher_file), "templates": "fashion-mnist",
                    "batch_size": 32},
        "views": {"count": 4},
        "cache": {"root": str(work / "cache")},
        "student": {"model": "resnet10t", "image_size": 32},
        "train": {"steps": steps, "log_every": LOG_EVERY, "checkpoint_every": steps,
                  "batch_labelled": batch["labelled"], "batch_unlabelled": batch["unlabelled"]},
    }))
    cfg = load_config(config)
    manifest = load_manifest(cfg.path(cfg.data.shards))

    tick = time.perf_counter()
    cache_teacher.run(cfg)
    stage_one_s = time.perf_counter() - tick
    views = sum(manifest.split_count(s) for s in ("labelled", "unlabelled")) * (1 + cfg.views.count) + sum(
        manifest.split_count(s) for s in ("val", "test"))
    stage_one = views / stage_one_s
    bare = bare_forward(cfg, manifest.class_names, views)

    runs = {"ce_only": (["train.method=ce_only"], batch["labelled"]),
            "dho_cached": (["train.method=dho"], sum(batch.values())),
            "dho_online": (["train.method=dho", "teacher.mode=online", "teacher.online_views=cached"],
                           sum(batch.values()))}
    stage_two = {}
    for name, (overrides, per_step) in runs.items():
        run_dir = work / "runs" / name
        train_student.run(load_config(config, [*overrides, f"train.out_dir={run_dir}"]))
        stage_two[name] = throughput(run_dir / "metrics.jsonl", per_step)

    return {
        "teacher": teacher_model, "student": "resnet10t@32px", "device": "cpu", "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "stage_one": {"views": views, "views_per_s": stage_one, "bare_forward_views_per_s": bare,
                      "ratio_to_bare_forward": stage_one / bare},
        "stage_two": stage_two,
        "ratios": {
            "dho_cached_vs_ce_only_images_per_s": stage_two["dho_cached"]["images_per_s"]
            / stage_two["ce_only"]["images_per_s"],
            "dho_cached_vs_ce_only_steps_per_s": stage_two["dho_cached"]["steps_per_s"]
            / stage_two["ce_only"]["steps_per_s"],
            "dho_cached_vs_online_steps_per_s": stage_two["dho_cached"]["steps_per_s"]
            / stage_two["dho_online"]["steps_per_s"],
        },
    }


if __name__ == "__main__":
    main()
