"""`dho demo`: the whole pipeline on Fashion-MNIST, offline, ending in an accuracy table.

A small CLIP teacher is pretrained contrastively on half of the training images (a stand-in for web-scale
pretraining; the student never sees them). The other half becomes the student's labelled / unlabelled /
val pool for each label budget. For each setting: make shards, cache the teacher, train the same student
with CE only, single-head KD, DHO from the cache and DHO with the online teacher, and evaluate on test.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from dho_pipeline.config import load_config
from dho_pipeline.shards import MANIFEST, write_shards
from dho_pipeline.sources import FASHION_MNIST_DIR, IdxSource, Item
from dho_pipeline.splits import assign_splits
from dho_pipeline.store_report import summarize
from dho_pipeline.templates import TEMPLATES
from dho_pipeline.tiny_clip import pretrain_tiny_clip
from stages import cache_teacher, evaluate, train_student

METHODS = ("ce_only", "single_head_kd", "dho", "dho_online")
METHOD_OVERRIDES = {
    "ce_only": ["train.method=ce_only"],
    "single_head_kd": ["train.method=single_head_kd"],
    "dho": ["train.method=dho"],
    "dho_online": ["train.method=dho", "teacher.mode=online", "teacher.online_views=fresh"],
}


@dataclass(frozen=True)
class Setting:
    """One label budget: `shots` per class or `percent` of the student pool, per class."""

    name: str
    shots: int | None = None
    percent: float | None = None


@dataclass(frozen=True)
class DemoPlan:
    settings: tuple[Setting, ...]
    teacher_images: int = 30_000
    teacher_epochs: int = 10
    unlabelled_per_class: int = 1000  # student pool cap per class (labelled + unlabelled)
    val_per_class: int = 50
    test_per_class: int | None = None  # None = the whole 10,000-image test set
    steps: int = 600
    views: int = 4
    student: str = "resnet10t"
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = METHODS
    extra: dict = field(default_factory=dict)


QUICK = DemoPlan(settings=(Setting("4-shot", shots=4),), teacher_epochs=1, unlabelled_per_class=300,
                 test_per_class=200, steps=150)
FULL = DemoPlan(settings=(Setting("1-shot", shots=1), Setting("4-shot", shots=4), Setting("16-shot", shots=16),
                          Setting("1%", percent=1.0), Setting("10%", percent=10.0)),
                seeds=(0, 1))


class DemoDataMissing(FileNotFoundError):
    """Fashion-MNIST is not installed; the message says how to get it."""


def load_fashion_mnist() -> IdxSource:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise DemoDataMissing(f"{FASHION_MNIST_DIR} not found. The demo uses Debian's Fashion-MNIST package: "
                              "sudo apt-get install dataset-fashion-mnist   (or run scripts/install.sh)")
    return IdxSource(FASHION_MNIST_DIR)


def teacher_checkpoint(source: IdxSource, pool: np.ndarray, plan: DemoPlan, out: Path) -> Path:
    """Pretrain the demo teacher on `pool` once; later runs with the same recipe reuse the file."""
    path = out / "teacher" / f"dho-tiny-clip-{len(pool)}img-{plan.teacher_epochs}ep.pt"
    if not path.exists():
        pretrain_tiny_clip(source.images["train"][pool], source.labels["train"][pool], source.class_names,
                           TEMPLATES["fashion-mnist"], path, epochs=plan.teacher_epochs)
    return path


def experiment_config(folder: Path, shards: Path, teacher: Path, plan: DemoPlan) -> Path:
    """The pipeline.yaml of one setting (kept beside its results, so it can be rerun by hand)."""
    doc = {
        "data": {"shards": str(shards.resolve()), "num_workers": 1},
        "teacher": {"model": "dho-tiny-clip", "pretrained": str(teacher.resolve()), "templates": "fashion-mnist"},
        "views": {"count": plan.views},
        "cache": {"root": str((folder.parent / "cache").resolve())},
        "student": {"model": plan.student, "image_size": 32},
        "train": {"steps": plan.steps, "batch_labelled": 64, "batch_unlabelled": 64, "log_every": 50,
                  "checkpoint_every": plan.steps, "out_dir": str((folder / "runs").resolve())},
        **plan.extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(out: Path, plan: DemoPlan, log=print) -> dict:
    """Run every setting of `plan` under `out`; returns (and writes) results.json."""
    out = Path(out)
    source = load_fashion_mnist()
    perm = np.random.default_rng(0).permutation(len(source.labels["train"]))
    teacher_pool, student_pool = perm[: plan.teacher_images], perm[plan.teacher_images:]
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    teacher = teacher_checkpoint(source, np.sort(teacher_pool), plan, out)
    timings["teacher_pretraining_s"] = time.perf_counter() - tick

    train_items = [Item(("train", int(i)), int(source.labels["train"][i])) for i in np.sort(student_pool)]
    results: dict = {"plan": asdict(plan), "settings": {}, "timings": timings}
    for setting in plan.settings:
        log(f"== {setting.name}")
        folder = out / setting.name
        shards = folder / "shards"
        if not (shards / MANIFEST).exists():
            splits = assign_splits(train_items, source.items("test"), len(source.class_names), shots=setting.shots,
                                   percent=setting.percent, val_per_class=plan.val_per_class,
                                   test_per_class=plan.test_per_class,
                                   max_train_per_class=plan.unlabelled_per_class, seed=1)
            write_shards(source, splits, shards, shard_size=1000)
        config = experiment_config(folder, shards, teacher, plan)
        tick = time.perf_counter()
        store = cache_teacher.run(load_config(config))
        timings[f"{setting.name}/cache_teacher_s"] = time.perf_counter() - tick
        report = summarize(store)
        accuracy = {"teacher": [report["teacher_accuracy"]["test"]]}
        for method in plan.methods:
            accuracy[method] = []
            for seed in plan.seeds:
                run_dir = folder / "runs" / f"{method}-seed{seed}"
                overrides = METHOD_OVERRIDES[method] + [f"train.seed={seed}", f"train.out_dir={run_dir}"]
                tick = time.perf_counter()
                train_student.run(load_config(config, overrides))
                timings[f"{setting.name}/{method}/seed{seed}_s"] = time.perf_counter() - tick
                result = evaluate.run(run_dir / "final.pt")
                accuracy[method].append(result["combined_searched"] if method.startswith("dho")
                                        else result["ce_head"])
                log(f"{setting.name} {method} seed {seed}: test top-1 {accuracy[method][-1]:.4f}")
        results["settings"][setting.name] = {
            "accuracy": {m: float(np.mean(v)) for m, v in accuracy.items()},
            "spread": {m: float(np.max(v) - np.min(v)) for m, v in accuracy.items()},
            "runs": accuracy,
            "teacher_view_accuracy": report["teacher_view_accuracy"]["labelled"],
            "labelled_images": report["split_rows"]["labelled"],
        }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    plot(results, out / "results.png")
    return results


def results_table(results: dict) -> str:
    """A markdown table: one row per setting, test top-1 per method (mean, with the spread over seeds)."""
    methods = ["teacher", *results["plan"]["methods"]]
    lines = ["| setting | labelled | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for name, s in results["settings"].items():
        cells = []
        for m in methods:
            spread = s["spread"][m]
            cells.append(f"{s['accuracy'][m]:.3f}" + (f" ±{spread / 2:.3f}" if spread else ""))
        lines.append(f"| {name} | {s['labelled_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Grouped bars: test top-1 per method for each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["teacher", *results["plan"]["methods"]]
    names = list(results["settings"])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
    for k, m in enumerate(methods):
        values = [results["settings"][n]["accuracy"][m] for n in names]
        ax.bar(np.arange(len(names)) + k * width, values, width, label=m)
    ax.set_xticks(np.arange(len(names)) + width * (len(methods) - 1) / 2, names)
    ax.set_ylabel("test top-1")
    ax.set_ylim(0, 1)
    ax.set_title("dho demo: Fashion-MNIST, student vs teacher")
    ax.legend(fontsize=8, ncol=len(methods), loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
