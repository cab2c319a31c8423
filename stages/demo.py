"""`dho demo`: the whole pipeline on Fashion-MNIST, offline, ending in an accuracy table.

Small CLIP teachers are pretrained contrastively on half of the training images (a stand-in for web-scale
pretraining; the student never sees them): a strong one, and in the full plan a weak one. The other half is
the student's labelled / unlabelled / val pool. For each setting (label budget, teacher, teacher head): make
shards, cache the teacher, train the same student with CE only, single-head KD, DHO from the cache and DHO
with the online teacher, and evaluate on test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from dho_pipeline.config import PipelineConfig, load_config
from dho_pipeline.data.shards import MANIFEST, load_manifest, write_shards
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource, Item
from dho_pipeline.data.splits import assign_splits
from dho_pipeline.errors import CheckpointError, DhoError
from dho_pipeline.store.report import summarize
from dho_pipeline.store.zarr_store import stores_under
from dho_pipeline.teacher.templates import TEMPLATES
from dho_pipeline.teacher.tiny_clip import pretrain_tiny_clip
from stages import cache_teacher, evaluate, train_student

METHODS = ("ce_only", "single_head_kd", "dho", "dho_online")
METHOD_OVERRIDES = {
    "ce_only": ["train.method=ce_only"],
    "single_head_kd": ["train.method=single_head_kd"],
    "dho": ["train.method=dho"],
    "dho_online": ["train.method=dho", "teacher.mode=online", "teacher.online_views=fresh"],
}


@dataclass(frozen=True)
class TeacherRecipe:
    """How long the demo teacher is pretrained, on the first `images` of the teacher's half of train."""

    images: int
    epochs: int
    batch_size: int = 128


@dataclass(frozen=True)
class Setting:
    """One row of the table: a label budget (`shots` per class or `percent` of the student pool per class),
    the teacher recipe and head it distils from, and the methods, seeds, training steps and cached views it
    runs (None = the plan's)."""

    name: str
    shots: int | None = None
    percent: float | None = None
    teacher: str = "strong"
    teacher_kind: str = "zero-shot"
    methods: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    steps: int | None = None
    views: int | None = None

    def resolved(self, plan: DemoPlan) -> Setting:
        """This setting with the plan's methods, seeds, steps and views wherever it leaves them None."""
        return replace(self, methods=self.methods or plan.methods, seeds=self.seeds or plan.seeds,
                       steps=self.steps or plan.steps, views=self.views or plan.views)

    @property
    def budget(self) -> str:
        return f"{self.shots}-shot" if self.shots is not None else f"{self.percent:g}pct"

    @property
    def folder(self) -> str:
        return self.name.replace("%", "pct").replace(" ", "-")


@dataclass(frozen=True)
class DemoPlan:
    settings: tuple[Setting, ...]
    teachers: dict[str, TeacherRecipe] = field(default_factory=lambda: {"strong": TeacherRecipe(30_000, 10)})
    teacher_pool: int = 30_000  # training images set aside for the teacher; the student never sees them
    unlabelled_per_class: int = 1000  # student pool cap per class (labelled + unlabelled)
    val_per_class: int = 50
    test_per_class: int | None = None  # None = the whole 10,000-image test set
    steps: int = 600
    views: int = 4
    student: str = "resnet10t"
    seeds: tuple[int, ...] = (0,)
    one_seed_methods: tuple[str, ...] = ()  # methods run with the first seed only
    methods: tuple[str, ...] = METHODS
    extra: dict = field(default_factory=dict)  # pipeline.yaml keys per section, set on every setting


QUICK = DemoPlan(settings=(Setting("4-shot", shots=4),), teachers={"strong": TeacherRecipe(30_000, 1)},
                 unlabelled_per_class=300, test_per_class=200, steps=150)
# Sized to stay under 30 minutes on 2 CPU cores. KD and DHO, whose gap is the question, run two seeds;
# CE-only and the online teacher (far from them, or there for the cost comparison) run one. 16-shot and 10%
# (strong teacher, 250 steps) show where DHO and single-head KD tie; the weak teacher with 1,000 labels,
# trained 4x longer, where DHO's CE head adds what the labels know (with a view per pass over the
# unlabelled images, the rule train-student warns about). 1-shot shows what distillation adds to 10 labels.
# The few-shot (Tip-Adapter) teachers and the temperature are compared by benchmarks/demo_followups.py.
FULL = DemoPlan(
    settings=(
        Setting("1-shot", shots=1, methods=("ce_only", "dho"), seeds=(0,)),
        Setting("16-shot", shots=16),
        Setting("10%", percent=10.0, methods=("ce_only", "single_head_kd", "dho")),
        Setting("10% weak teacher", percent=10.0, teacher="weak", methods=("ce_only", "single_head_kd", "dho"),
                steps=1000, views=8),
    ),
    teachers={"strong": TeacherRecipe(30_000, 7), "weak": TeacherRecipe(2_000, 3, batch_size=64)},
    test_per_class=500, steps=250, seeds=(0, 1), one_seed_methods=("ce_only", "dho_online"),
)


class DemoDataMissing(FileNotFoundError):
    """Fashion-MNIST is not installed; the message says how to get it."""


def load_fashion_mnist() -> IdxSource:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise DemoDataMissing(f"{FASHION_MNIST_DIR} not found. The demo uses Debian's Fashion-MNIST package: "
                              "sudo apt-get install dataset-fashion-mnist   (or run scripts/install.sh), or set "
                              "DHO_FASHION_MNIST to a folder of its four idx files")
    return IdxSource(FASHION_MNIST_DIR)


def teacher_file(out: Path, name: str, recipe: TeacherRecipe) -> Path:
    """Where the demo keeps the teacher `name` pretrained with `recipe` (pipeline.yaml's example uses QUICK's)."""
    return out / "teacher" / f"dho-tiny-clip-{name}-{recipe.images}img-{recipe.epochs}ep.pt"


def teacher_checkpoint(source: IdxSource, pool: np.ndarray, name: str, recipe: TeacherRecipe, out: Path,
                       log=print) -> Path:
    """Pretrain a demo teacher on the first `recipe.images` of `pool` once; later runs reuse the file."""
    path = teacher_file(out, name, recipe)
    if not path.exists():
        log(f"pretraining the {name} demo teacher (tiny CLIP from random init) on {recipe.images} images "
            f"for {recipe.epochs} epochs -> {path}")
        images = np.sort(pool[: recipe.images])
        pretrain_tiny_clip(source.images["train"][images], source.labels["train"][images], source.class_names,
                           TEMPLATES["fashion-mnist"], path, epochs=recipe.epochs, batch_size=recipe.batch_size)
    return path


def experiment_config(folder: Path, shards: Path, teacher: Path, setting: Setting, plan: DemoPlan) -> Path:
    """The pipeline.yaml of one resolved setting (kept beside its results, so it can be rerun by hand)."""
    doc = {
        "data": {"shards": str(shards.resolve()), "num_workers": 1},
        "teacher": {"model": "dho-tiny-clip", "pretrained": str(teacher.resolve()), "templates": "fashion-mnist",
                    "kind": setting.teacher_kind},
        "views": {"count": setting.views},
        "cache": {"root": str((folder.parent / "cache").resolve())},  # shared: equal teachers share a store
        "student": {"model": plan.student, "image_size": 32},
        "train": {"steps": setting.steps, "batch_labelled": 64, "batch_unlabelled": 64, "log_every": 50,
                  "channels_last": True,  # about 10% faster steps for this student on CPU
                  "checkpoint_every": setting.steps, "out_dir": str((folder / "runs").resolve())},
    }
    for section, values in plan.extra.items():  # single keys per section, e.g. {"train": {"lr": 5e-4}}
        doc.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def setting_shards(out: Path, source: IdxSource, train_items: list[Item], setting: Setting, plan: DemoPlan) -> Path:
    """The shards of a setting's label budget under `out`, written once; shards an earlier plan split otherwise
    (other split sizes, teacher pool or seed) are refused rather than reused."""
    shards = out / "shards" / setting.budget
    split = {"shots": setting.shots, "percent": setting.percent, "val_per_class": plan.val_per_class,
             "test_per_class": plan.test_per_class, "max_train_per_class": plan.unlabelled_per_class,
             "teacher_pool": plan.teacher_pool, "seed": 1}
    if (shards / MANIFEST).exists():
        made = load_manifest(shards).info.get("demo_split", split)  # none from before the demo recorded it
        if made != split:
            changed = ", ".join(f"{k} {made.get(k)} -> {v}" for k, v in split.items() if made.get(k) != v)
            raise DhoError(f"{shards} holds the {setting.budget} shards of another demo plan ({changed}): "
                           "use another --out, or remove that folder")
        return shards
    splits = assign_splits(train_items, source.items("test"), len(source.class_names), shots=setting.shots,
                           percent=setting.percent, val_per_class=plan.val_per_class,
                           test_per_class=plan.test_per_class, max_train_per_class=plan.unlabelled_per_class,
                           seed=split["seed"])
    write_shards(source, splits, shards, shard_size=1000, info={"demo_split": split})
    return shards


def run(out: Path, plan: DemoPlan, log: Callable[[str], None] = print, retrain: bool = False) -> dict:
    """Run every setting of `plan` under `out`; returns (and writes) results.json, results.md and results.png.

    A call continues where an earlier one under `out` stopped: it reuses the teachers, shards and stores, keeps
    each finished run and continues each stopped one from its last.pt, as long as the run's settings and inputs
    are the same (train-student --resume checks them). `retrain` first removes every run's files, so each trains
    from the start (and a retrain stopped half-way leaves no earlier run to keep). results.json lists what was
    reused; its timings cover the work this call did.
    """
    out = Path(out).resolve()  # settings' pipeline.yaml files resolve relative paths from their own folder
    source = load_fashion_mnist()
    perm = np.random.default_rng(0).permutation(len(source.labels["train"]))
    teacher_pool, student_pool = perm[: plan.teacher_pool], perm[plan.teacher_pool:]
    settings = [each.resolved(plan) for each in plan.settings]
    if retrain:
        for setting in settings:
            for method, seed in setting_runs(setting, plan):
                for path in train_student.run_files(run_folder(out, setting, method, seed)):
                    path.unlink()
    timings: dict[str, float] = {}
    reused: list[str] = []
    started = time.perf_counter()

    teachers = {}
    for name, recipe in plan.teachers.items():
        tick, made = time.perf_counter(), not teacher_file(out, name, recipe).exists()
        teachers[name] = teacher_checkpoint(source, teacher_pool, name, recipe, out, log)
        if made:
            timings[f"teacher_pretraining_{name}_s"] = time.perf_counter() - tick
        else:
            reused.append(f"teacher {name}")

    train_items = [Item(("train", int(i)), int(source.labels["train"][i])) for i in np.sort(student_pool)]
    results: dict = {"plan": asdict(plan), "settings": {}, "timings": timings, "reused": reused}
    for setting in settings:
        log(f"== {setting.name}")
        shards = setting_shards(out, source, train_items, setting, plan)
        config = experiment_config(out / setting.folder, shards, teachers[setting.teacher], setting, plan)
        tick, earlier_stores = time.perf_counter(), {str(path) for path in stores_under(out / "cache")}
        store = cache_teacher.run(load_config(config)).path
        if str(store) in earlier_stores:
            reused.append(f"{setting.name} store")
        else:
            timings[f"{setting.name}/cache_teacher_s"] = time.perf_counter() - tick
        report = summarize(store)
        accuracy: dict[str, list[float]] = {"teacher": [report["teacher_accuracy"]["test"]]}
        for method, seed in setting_runs(setting, plan):
            run_dir, name = run_folder(out, setting, method, seed), f"{setting.name}/{method}/seed{seed}"
            cfg = load_config(config, METHOD_OVERRIDES[method] + [f"train.seed={seed}", f"train.out_dir={run_dir}"])
            if continue_earlier_run(cfg, log):
                reused.append(name)
            else:
                tick = time.perf_counter()
                train_student.run(cfg, overwrite=True)
                timings[f"{name}_s"] = time.perf_counter() - tick
            result = evaluate.run(run_dir / "final.pt")
            accuracy.setdefault(method, []).append(result["combined_searched"])  # what it deploys
            log(f"{setting.name} {method} seed {seed}: test top-1 {accuracy[method][-1]:.4f}")
        zero_shot = report["teacher_zero_shot_accuracy"]["test"]  # None: the teacher is zero-shot
        results["settings"][setting.name] = {
            "accuracy": {m: float(np.mean(v)) for m, v in accuracy.items()},
            "spread": {m: float(np.max(v) - np.min(v)) for m, v in accuracy.items()},
            "runs": accuracy,
            "teacher_kind": setting.teacher_kind,
            "steps": setting.steps,
            "views": setting.views,
            "teacher_zero_shot": report["teacher_accuracy"]["test"] if zero_shot is None else zero_shot,
            "teacher_view_accuracy": report["teacher_view_accuracy"],  # per split, on the cached random views
            "labelled_images": report["split_rows"]["labelled"],
            "unlabelled_images": report["split_rows"]["unlabelled"],
        }
    timings["total_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    plot(results, out / "results.png")
    return results


def setting_runs(setting: Setting, plan: DemoPlan) -> list[tuple[str, int]]:
    """The (method, seed) runs of a resolved setting, in order: the first seed only for plan.one_seed_methods."""
    return [(method, seed) for method in setting.methods
            for seed in (setting.seeds[:1] if method in plan.one_seed_methods else setting.seeds)]


def run_folder(out: Path, setting: Setting, method: str, seed: int) -> Path:
    """Where the run of `method` and `seed` in `setting` keeps its checkpoints and metrics."""
    return out / setting.folder / "runs" / f"{method}-seed{seed}"


def continue_earlier_run(cfg: PipelineConfig, log: Callable[[str], None] = print) -> bool:
    """Keep or continue the run an earlier call left in cfg's train.out_dir: a finished one is kept, a stopped one
    goes on from its last.pt. False when there is no last.pt, or the run was trained otherwise (the plan changed)."""
    folder = cfg.path(cfg.train.out_dir)
    finished = (folder / "final.pt").exists()
    if not (folder / "last.pt").exists():
        if finished:
            log(f"training {folder} again: it holds final.pt but no last.pt to check its settings against")
        return False
    try:
        train_student.run(cfg, resume=True)
    except train_student.ResumeMismatch as e:
        log(f"training {folder} again: the plan changed since ({', '.join(e.differences)})")
        return False
    except CheckpointError as e:
        log(f"training {folder} again: {e}")
        return False
    log(f"kept {folder}, finished by an earlier call" if finished else
        f"continued {folder} from the last.pt of an earlier call")
    return True


def results_table(results: dict) -> str:
    """Markdown: one row per setting, test top-1 per method (mean ± half the spread over seeds; — not run)."""
    methods = ["teacher", *results["plan"]["methods"]]
    lines = ["| setting | labelled | steps | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for name, s in results["settings"].items():
        cells = []
        for m in methods:
            if m not in s["accuracy"]:
                cells.append("—")
                continue
            spread = s["spread"][m]
            cells.append(f"{s['accuracy'][m]:.3f}" + (f" ±{spread / 2:.3f}" if spread else ""))
        lines.append(f"| {name} | {s['labelled_images']} | {s['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Grouped bars: test top-1 per method for each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["teacher", *results["plan"]["methods"]]
    names = list(results["settings"])
    labels = [f"{n}\n{results['settings'][n]['steps']} steps" for n in names]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
    for k, m in enumerate(methods):
        values = [results["settings"][n]["accuracy"].get(m, np.nan) for n in names]
        bars = ax.bar(np.arange(len(names)) + k * width, values, width, label=m)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(np.arange(len(names)) + width * (len(methods) - 1) / 2, labels)
    ax.set_ylabel("test top-1")
    ax.set_ylim(0, 1.08)  # room for the bar labels
    ax.set_title("dho demo: Fashion-MNIST, student vs teacher")
    ax.legend(fontsize=8, ncol=len(methods), loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
