"""How many cached views K does the student need to match the online teacher on fresh views? (issue 14)

Fashion-MNIST, the demo's strong teacher (the tiny CLIP that `dho demo` pretrains for 7 epochs on 30,000
training images the student never sees), and the demo's student (timm resnet10t at 32 px, 64 labelled +
64 unlabelled images a step, channels_last). The student pool is small so that the views run out: `--pool`
unlabelled images (2,000 by default, a tenth a class) trained for `--epochs` passes over them (30: 960
steps), so each unlabelled image is seen 30 times. The labelled split is 16-shot (16 images a class, 160 in
all; `--shots`): labels are scarce, so the KD signal, and with it the views the teacher's logits were taken
on, carries the result (the demo's 16-shot row). Val is 50 images a class (500), the whole 10,000-image
test set reports the numbers.

For every K in `--ks` (1, 2, 4, 8, 16, 32) stage one caches one store (the fingerprint holds the view recipe,
so each K is its own store) and each method in `--methods` (dho, single_head_kd) trains from it with each
seed in `--seeds` (0, 1); in epoch e row r uses cached view 1 + (r + e + seed) mod K. The reference runs
the same methods and seeds with the teacher online on fresh views (`teacher.mode: online`,
`teacher.online_views: fresh`: view 1 + e in epoch e, a new view every pass). Note that in the cached runs
the labelled images are limited to their K views as well (they pass about 384 times in 960 steps), while
the online runs draw a fresh view on every pass of the labelled split too. The fresh views come from the
same seeded recipe as the cached ones (view v of row r is the same crop either way), so the online run
uses views 1..E over E epochs: on the unlabelled split it is the cached run with K = E views in another
order (with E = 1 the K = 1 run and the online one see the same unlabelled views).
Loader workers: 2 a split (`--num-workers`; the CLI's default, and on 2 cores a little faster than the
demo's 1 for the cached runs, level for the online ones).

Everything goes through the real stages (`stages.cache_teacher.run`, `stages.train_student.run`,
`stages.evaluate.run`, as benchmarks/demo_followups.py). Evaluate searches DHO's alpha/beta on val; test
top-1 of what each checkpoint deploys is the number (the CE head alone for single-head KD). Recorded per K:
the store's bytes on disk and the stage-one wall time; per run: the training wall time (cached and online
beside each other), the median images/s from metrics.jsonl, val and test top-1 of every head.

Rerunnable and resumable: shards, stores and finished runs are kept under the output folder (a finished
run's result.json is read back, a run with final.pt but no result.json is only evaluated, a killed run
resumes from its last.pt, saved every 5 epochs, through `train_student.run(resume=True)`; a killed stage
one resumes by itself). Settings with another pool, label budget or epoch count get their own folder
(`pool2000-16shot-30ep`), so a smoke run never mixes with the full one. last.pt is deleted once final.pt
is there (about 65 MB a run).

Usage:

    python benchmarks/views_vs_online.py                          # the full run, writes docs/views-vs-online.*
    python benchmarks/views_vs_online.py --demo-out demo-out      # reuse a finished `dho demo`'s teacher file
    python benchmarks/views_vs_online.py --out /tmp/vvo --json /tmp/vvo/views-vs-online.json \\
        --ks 1 2 --seeds 0 --epochs 1 --pool 200                  # smoke version: a few minutes

Outputs: the JSON (`--json`, default docs/views-vs-online.json), a markdown table and a PNG plot beside it
(same name, .md and .png), and a printed line naming, per method, the smallest K whose mean test top-1 is
within 0.3 points of the online teacher's mean. Work files (teacher, shards, stores, runs) go to `--out`
(default runs/views-vs-online, ignored by git). Without `--demo-out`/`--teacher` the strong teacher is
pretrained the demo's way into OUT/teacher/ (194 s on 2 cores in the demo's measurement, 332 s here, once).

Cost on 2 CPU cores (2026-11-26): the smoke version above took 2.3 minutes after the teacher pretraining
(5.5 minutes, once; 20 s to rerun it all, finished). The full default run (6 stores, 28 student runs of
960 steps: 24 cached, 4 online) took about 3 h 30 min: a cached run's train_student.run is 370-410 s
(0.40 s a step, per-epoch val included), an online one 440-450 s, 14 s to evaluate either on val and the
10,000 test images, and the six stores 2.5 minutes of stage one together. K = 32 was added after the first
five K left DHO 0.34 points short of online at K = 16 (issue 14, item 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from dho_pipeline.config import load_config
from dho_pipeline.data.shards import MANIFEST, load_manifest, write_shards
from dho_pipeline.data.sources import Item
from dho_pipeline.data.splits import assign_splits
from dho_pipeline.errors import human_bytes
from dho_pipeline.store.lookup import find_store
from dho_pipeline.store.report import summarize
from dho_pipeline.store.zarr_store import TeacherStore
from dho_pipeline.student.checkpoint import load_checkpoint
from stages import cache_teacher, evaluate, train_student
from stages.demo import FULL, load_fashion_mnist, teacher_checkpoint, teacher_file

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dho", "single_head_kd")
ONLINE = ["teacher.mode=online", "teacher.online_views=fresh"]
STRONG = FULL.teachers["strong"]  # the demo's strong teacher: 30,000 images, 7 epochs
WITHIN = 0.003  # 0.3 points of top-1
CHECKPOINT_EPOCHS = 5  # last.pt every 5 epochs: what a killed run loses at most


@dataclass(frozen=True)
class Setup:
    """The data and budget every run of one table shares; its name is the folder its runs live in."""

    pool: int = 2000  # unlabelled images (pool // 10 a class)
    shots: int = 16  # labelled images a class
    epochs: int = 30  # passes over the unlabelled split
    val_per_class: int = 50
    test_per_class: int | None = None  # None: the whole 10,000-image test set
    batch: int = 64  # labelled and unlabelled images a step, each
    num_workers: int = 2  # loader workers per split; not in the name (it changes the sample order, not the data)

    @property
    def data_name(self) -> str:
        """The shards' (and so the stores') name: runs with other epoch counts share them."""
        test = "" if self.test_per_class is None else f"-test{self.test_per_class}"
        return f"pool{self.pool}-{self.shots}shot{test}"

    @property
    def name(self) -> str:
        return f"{self.data_name}-{self.epochs}ep"


def obtain_teacher(out: Path, demo_out: Path | None, teacher: Path | None, source, teacher_pool: np.ndarray,
                   log=print) -> tuple[Path, float | None]:
    """The strong demo teacher: --teacher, else a finished demo's file, else pretrained (once) into OUT/teacher."""
    if teacher is not None:
        return teacher.resolve(), None
    if demo_out is not None:
        path = teacher_file(demo_out.resolve(), "strong", STRONG)
        if path.exists():
            return path, None
        log(f"{path} not found (a `dho demo --quick` folder has the 1-epoch teacher only); using OUT/teacher")
    if teacher_file(out, "strong", STRONG).exists():
        return teacher_file(out, "strong", STRONG), None
    tick = time.perf_counter()
    path = teacher_checkpoint(source, teacher_pool, "strong", STRONG, out, log)
    return path, time.perf_counter() - tick


def make_shards(out: Path, source, student_pool: np.ndarray, setup: Setup) -> Path:
    """16-shot (--shots) labelled, pool // 10 unlabelled and 50 val a class from the demo's student half."""
    shards = out / "shards" / setup.data_name
    if not (shards / MANIFEST).exists():
        items = [Item(("train", int(i)), int(source.labels["train"][i])) for i in np.sort(student_pool)]
        splits = assign_splits(items, source.items("test"), len(source.class_names), shots=setup.shots,
                               val_per_class=setup.val_per_class, test_per_class=setup.test_per_class,
                               max_train_per_class=setup.shots + setup.pool // len(source.class_names), seed=1)
        write_shards(source, splits, shards, shard_size=1000)
    return shards


def write_config(folder: Path, shards: Path, teacher: Path, setup: Setup, steps_per_epoch: int) -> Path:
    """The folder's pipeline.yaml: the demo's student and batches; K (views.count) and the method per run."""
    doc = {
        "data": {"shards": str(shards.resolve()), "num_workers": setup.num_workers},
        "teacher": {"model": "dho-tiny-clip", "pretrained": str(teacher.resolve()), "templates": "fashion-mnist"},
        "cache": {"root": str((folder.parent / "cache").resolve())},  # shared: equal shards and K share a store
        "student": {"model": "resnet10t", "image_size": 32},
        "train": {"epochs": setup.epochs, "batch_labelled": setup.batch, "batch_unlabelled": setup.batch,
                  "log_every": steps_per_epoch, "channels_last": True},
    }
    return write_pipeline_yaml(folder, doc, CHECKPOINT_EPOCHS * steps_per_epoch)


def write_pipeline_yaml(folder: Path, doc: dict, checkpoint_every: int) -> Path:
    """FOLDER/pipeline.yaml from `doc`, its runs under FOLDER/runs with last.pt every `checkpoint_every` steps."""
    doc["train"].update(checkpoint_every=checkpoint_every, out_dir=str((folder / "runs").resolve()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, value) -> None:
    """Write beside and rename: a kill never leaves half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def stage_one(config: Path, record_path: Path, k: int, log=print) -> dict:
    """Cache the teacher with K views (a verified no-op when done); its bytes and the wall time of creating it."""
    record = read_json(record_path)
    cfg = load_config(config, [f"views.count={k}"])
    if record is None:
        try:
            find_store(cfg, load_manifest(cfg.location(cfg.data.shards)))
            existed = True  # left by a killed invocation: the time measured now is not all of it
        except FileNotFoundError:
            existed = False
        log(f"stage one, K={k}")
        tick = time.perf_counter()
        path = cache_teacher.run(cfg).path
        seconds = time.perf_counter() - tick
        report = summarize(path)
        record = {"k": k, "store": str(path), "seconds": seconds, "resumed": existed,
                  "bytes_on_disk": TeacherStore.open(path).bytes_on_disk(), "rows": report["rows"],
                  "views": report["views"], "teacher_test": report["teacher_accuracy"]["test"],
                  "teacher_view_accuracy": report["teacher_view_accuracy"]}
        write_json(record_path, record)
    else:
        cache_teacher.run(cfg)  # checks the store is still there and whole (recomputes lost shards)
    return record


def median_images_per_s(metrics: Path) -> float | None:
    """Median images/s over metrics.jsonl's log lines after the first (warm-up, workers starting)."""
    speeds = [r["images_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "images_per_s" in r]
    return statistics.median(speeds[1:] or speeds) if speeds else None


def val_curve(metrics: Path) -> list[list[float]]:
    """[epoch, CE head, KD head, combined at the defaults] on val, per epoch."""
    return [[r["epoch"], r["val"]["ce_head"], r["val"]["kd_head"], r["val"]["combined"]]
            for r in map(json.loads, metrics.read_text().splitlines()) if "val" in r]


def student_run(config: Path, run_dir: Path, method: str, seed: int, k: int | None, log=print) -> dict:
    """Train (resuming a killed run), evaluate and record one run; a finished run is read back."""
    record_path = run_dir / "result.json"
    if (record := read_json(record_path)) is not None:
        return record
    overrides = [f"train.method={method}", f"train.seed={seed}", f"train.out_dir={run_dir}"]
    overrides += ONLINE if k is None else [f"views.count={k}"]
    cfg = load_config(config, overrides)
    final, last = run_dir / "final.pt", run_dir / "last.pt"
    timing = read_json(run_dir / "timing.json") or {}
    if not final.exists():
        resumed_from = load_checkpoint(last)["step"] if last.exists() else 0
        log(f"training {run_dir.name}" + (f", resuming at step {resumed_from}" if resumed_from else ""))
        tick = time.perf_counter()
        train_student.run(cfg, resume=last.exists())
        timing = {"train_s": time.perf_counter() - tick, "resumed_from_step": resumed_from}
        write_json(run_dir / "timing.json", timing)
    tick = time.perf_counter()
    result = evaluate.run(final)
    evaluate_s = time.perf_counter() - tick
    metrics = run_dir / "metrics.jsonl"
    record = {
        "run": run_dir.name, "method": method, "seed": seed, "k": k, "mode": "cached" if k is not None else "online",
        "test": result["combined_searched"], "val": result["val_combined_searched"],
        "alpha": result["alpha"] if method == "dho" else None, "beta": result["beta"] if method == "dho" else None,
        "test_heads": {h: result[h] for h in ("ce_head", "kd_head", "combined_default")},
        "teacher_test": result["teacher"], "steps": json.loads(metrics.read_text().splitlines()[-1])["step"],
        "train_s": timing.get("train_s"), "resumed_from_step": timing.get("resumed_from_step"),
        "num_workers": cfg.data.num_workers, "images_per_s": median_images_per_s(metrics), "evaluate_s": evaluate_s,
        "val_curve": val_curve(metrics),
    }
    write_json(record_path, record)
    last.unlink(missing_ok=True)  # final.pt holds the same weights; a finished run is never resumed
    log(f"{run_dir.name}: val {record['val']:.4f}, test {record['test']:.4f}, "
        f"train {record['train_s'] or float('nan'):.0f} s")
    return record


def aggregate(results: dict) -> dict:
    """Per method: test top-1 per K and online (runs, mean, min, max), training seconds and images/s."""
    table: dict = {}
    for method in results["setup"]["methods"]:
        rows = {}
        for key in [*results["setup"]["ks"], None]:
            runs = [r for r in results["runs"] if r["method"] == method and r["k"] == key]
            if not runs:
                continue
            tests = [r["test"] for r in runs]
            times = [r["train_s"] for r in runs if r["train_s"] is not None and not r["resumed_from_step"]]
            speeds = [r["images_per_s"] for r in runs if r["images_per_s"] is not None]
            rows["online" if key is None else str(key)] = {
                "seeds": [r["seed"] for r in runs], "test": tests, "mean": float(np.mean(tests)),
                "min": min(tests), "max": max(tests), "val_mean": float(np.mean([r["val"] for r in runs])),
                "train_s_mean": float(np.mean(times)) if times else None,
                "images_per_s_mean": float(np.mean(speeds)) if speeds else None,
            }
        table[method] = rows
    return table


def smallest_k(results: dict) -> dict[str, int | None]:
    """Per method: the smallest K whose mean test top-1 is within 0.3 points of (or above) the online mean."""
    found = {}
    for method, rows in results["summary"].items():
        online = rows.get("online")
        ks = sorted(int(k) for k in rows if k != "online")
        found[method] = next((k for k in ks if online and rows[str(k)]["mean"] >= online["mean"] - WITHIN), None)
    return found


def smallest_k_line(results: dict) -> str:
    parts = []
    for method, k in results["smallest_k"].items():
        rows = results["summary"][method]
        if "online" not in rows:
            parts.append(f"{method}: no online run")
        elif k is None:
            cached = [key for key in rows if key != "online"]
            best = max(cached, key=lambda key: rows[key]["mean"], default=None)
            parts.append(f"{method}: none of K = {', '.join(cached) or '(no cached runs)'}"
                         + (f" (best K={best}: {rows[best]['mean']:.4f} vs online {rows['online']['mean']:.4f})"
                            if best else ""))
        else:
            parts.append(f"{method}: K={k} ({rows[str(k)]['mean']:.4f} vs online {rows['online']['mean']:.4f})")
    return "smallest K within 0.3 points of the online teacher (mean test top-1 over seeds): " + "; ".join(parts)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def cell(row: dict | None) -> str:
    if row is None:
        return "—"
    half = (row["max"] - row["min"]) / 2
    return f"{row['mean']:.3f}" + (f" ±{half:.3f}" if len(row["test"]) > 1 else "")


def seconds(row: dict | None) -> str:
    return "—" if row is None or row["train_s_mean"] is None else f"{row['train_s_mean']:.0f}"


def results_table(results: dict) -> str:
    """Markdown: one row per K (store bytes, stage-one s, test top-1 and train s per method), online last."""
    setup, methods, summary = results["setup"], results["setup"]["methods"], results["summary"]
    teacher = next((s["teacher_test"] for s in results["stage_one"].values()), None)
    lines = [
        f"Fashion-MNIST, {setup['shots']}-shot ({setup['labelled_images']} labelled), "
        f"{setup['unlabelled_images']:,} unlabelled, {plural(setup['epochs'], 'epoch')} ({setup['steps']} steps of "
        f"{setup['batch']} + {setup['batch']}), seeds {', '.join(map(str, setup['seeds']))}; test top-1 on "
        f"{setup['test_images']:,} test images, mean ± half the spread over seeds"
        + (f"; teacher {teacher:.3f} on the clean test view" if teacher is not None else "") + ".",
        "",
        "| K views | store | stage one (s) | " + " | ".join(f"{m} | {m} train (s)" for m in methods) + " |",
        "|---|---|---|" + "---|---|" * len(methods),
    ]
    for k in setup["ks"]:
        s = results["stage_one"].get(str(k))
        store = human_bytes(s["bytes_on_disk"]) if s else "—"
        stage = (f"{s['seconds']:.1f}" + ("*" if s["resumed"] else "")) if s else "—"
        cells = [f"{cell(summary[m].get(str(k)))} | {seconds(summary[m].get(str(k)))}" for m in methods]
        lines.append(f"| {k} | {store} | {stage} | " + " | ".join(cells) + " |")
    if any("online" in summary[m] for m in methods):
        cells = [f"{cell(summary[m].get('online'))} | {seconds(summary[m].get('online'))}" for m in methods]
        lines.append("| online, fresh views | — | — | " + " | ".join(cells) + " |")
    lines += ["", smallest_k_line(results) + ".",
              "", "Train (s): wall time of `train_student.run` (mean over seeds, resumed runs left out); "
              "* stage one resumed, its time is partial."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Test top-1 against K (log2 axis), one line per method with its seed range; online as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, (method, rows) in enumerate(results["summary"].items()):
        colour = f"C{index}"
        ks = [k for k in results["setup"]["ks"] if str(k) in rows]
        if ks:
            mean = np.array([rows[str(k)]["mean"] for k in ks])
            low = mean - np.array([rows[str(k)]["min"] for k in ks])
            high = np.array([rows[str(k)]["max"] for k in ks]) - mean
            ax.errorbar(ks, mean, yerr=[low, high], marker="o", capsize=3, color=colour, label=f"{method}, cached")
        if "online" in rows:
            online = rows["online"]
            ax.axhspan(online["min"], online["max"], color=colour, alpha=0.2, lw=0)
            ax.axhline(online["mean"], color=colour, ls="--", lw=1, label=f"{method}, online (seed range)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["setup"]["ks"], [str(k) for k in results["setup"]["ks"]])
    ax.minorticks_off()
    ax.set_xlabel("cached views K (views.count)")
    ax.set_ylabel("test top-1")
    setup = results["setup"]
    ax.set_title(f"Fashion-MNIST {setup['shots']}-shot, {setup['unlabelled_images']:,} unlabelled, "
                 f"{plural(setup['epochs'], 'epoch')}: cached K views vs online", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first run is done
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_outputs(results: dict, json_path: Path, table, draw) -> None:
    """The results JSON, its markdown `table(results)` (.md) and `draw(results, png)` (.png) beside it."""
    write_json(json_path, results)
    json_path.with_suffix(".md").write_text(table(results))
    draw(results, json_path.with_suffix(".png"))


def write_outputs(results: dict, json_path: Path) -> None:
    results["summary"] = aggregate(results)
    results["smallest_k"] = smallest_k(results)
    save_outputs(results, json_path, results_table, plot)


def output_parser(doc: str, name: str, work: str) -> argparse.ArgumentParser:
    """A benchmark's parser with --out (work folder runs/NAME) and --json (docs/NAME.json; .md, .png beside it)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / name,
                   help=f"work folder: {work} (default runs/{name})")
    p.add_argument("--json", type=Path, default=REPO / "docs" / f"{name}.json",
                   help=f"results JSON; the .md table and .png plot go beside it (default docs/{name}.json)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = output_parser(__doc__, "views-vs-online", "teacher, shards, stores, runs")
    p.add_argument("--demo-out", type=Path, help="a finished `dho demo` folder whose strong teacher file to reuse")
    p.add_argument("--teacher", type=Path, help="the teacher checkpoint file itself (dho-tiny-clip)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="cached views K")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=30, help="passes over the unlabelled split")
    p.add_argument("--pool", type=int, default=2000, help="unlabelled images (a tenth a class)")
    p.add_argument("--shots", type=int, default=16, help="labelled images a class")
    p.add_argument("--test-per-class", type=int, default=None, help="test images a class (default: all 1,000)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="data.num_workers (on 2 cores 2 gave 1.1-1.2x the cached images/s of 1; online level)")
    p.add_argument("--no-online", action="store_true", help="skip the online reference runs")
    args = p.parse_args(argv)
    if any(k < 1 for k in args.ks) or args.epochs < 1 or args.pool < 10:
        p.error("--ks, --epochs need to be >= 1 and --pool >= 10")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.out.resolve()
    source = load_fashion_mnist()
    perm = np.random.default_rng(0).permutation(len(source.labels["train"]))  # the demo's teacher/student halves
    teacher_pool, student_pool = perm[: FULL.teacher_pool], perm[FULL.teacher_pool:]
    teacher, pretrain_s = obtain_teacher(out, args.demo_out, args.teacher, source, teacher_pool)

    setup = Setup(pool=args.pool, shots=args.shots, epochs=args.epochs, test_per_class=args.test_per_class,
                  num_workers=args.num_workers)
    manifest = load_manifest(make_shards(out, source, student_pool, setup))
    steps_per_epoch = math.ceil(manifest.split_count("unlabelled") / setup.batch)
    folder = out / setup.name
    config = write_config(folder, manifest.root, teacher, setup, steps_per_epoch)
    ks, methods = sorted(set(args.ks)), [m for m in METHODS if m in args.methods]
    results: dict = {
        "setup": {**asdict(setup), "ks": ks, "seeds": args.seeds, "methods": methods, "online": not args.no_online,
                  "labelled_images": manifest.split_count("labelled"),
                  "unlabelled_images": manifest.split_count("unlabelled"),
                  "val_images": manifest.split_count("val"), "test_images": manifest.split_count("test"),
                  "steps": steps_per_epoch * setup.epochs, "teacher": str(teacher), "student": "resnet10t@32",
                  "folder": str(folder), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__, "date": datetime.date.today().isoformat()},
        "teacher_pretraining_s": pretrain_s, "stage_one": {}, "runs": [],
    }
    for k in ks:
        results["stage_one"][str(k)] = stage_one(config, out / "stage-one" / f"{setup.data_name}-K{k}.json", k)
    write_outputs(results, args.json)
    plan = [] if args.no_online else [(None, m, s) for m in methods for s in args.seeds]
    plan += [(k, m, s) for k in ks for m in methods for s in args.seeds]
    for k, method, seed in plan:
        name = f"{'online' if k is None else f'K{k}'}-{method}-seed{seed}"
        results["runs"].append(student_run(config, folder / "runs" / name, method, seed, k))
        write_outputs(results, args.json)
    results["wall_s_this_invocation"] = time.perf_counter() - started
    write_outputs(results, args.json)
    print(results_table(results))
    print(smallest_k_line(results))
    return results


if __name__ == "__main__":
    main()
