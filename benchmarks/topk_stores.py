"""What a top-k store (cache.top_k) costs and saves (issue 16), through the real stages.

* Accuracy: the demo's "10%" setting (Fashion-MNIST, the demo's strong teacher, 1,000 labelled + 9,000
  unlabelled images, 4 random views, 250 steps of DHO, the test set the demo uses) from a dense store and
  from top-k stores, k in `--ks` (1, 2, 3, 5 of 10 classes), seeds 0 and 1; test top-1 of what each
  checkpoint deploys (alpha/beta searched on val).
* Many classes: the same teacher with 1,000 class names (Fashion-MNIST's 10 and 990 more, "class 10", ...)
  over 2,000 real test images, stored dense and top-k for k in `--wide-ks` (10, 20, 50, 100). Reported:
  bytes per view on disk of the logit arrays, and the KL at the training temperature between the dense
  teacher distribution and its top-k completion (the k exact probabilities, the rest of the mass spread
  evenly over the other classes), mean and 99th percentile over views.

Usage (needs the demo's strong teacher, e.g. from `dho demo --out demo-out`):

    python benchmarks/topk_stores.py --teacher demo-out/teacher/dho-tiny-clip-strong-30000img-7ep.pt
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from dho_pipeline.config import load_config
from dho_pipeline.data.shards import MANIFEST, load_manifest, write_shards
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource, Item
from dho_pipeline.data.splits import assign_splits
from dho_pipeline.store.zarr_store import TeacherStore
from stages import cache_teacher, evaluate, train_student
from stages.demo import FULL, experiment_config

LOGIT_ARRAYS = ("logits", "top_values", "top_indices", "lse")
TEMPERATURE = 2.0


@click.command()
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The demo's strong teacher checkpoint (dho-tiny-clip).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("topk-out"), show_default=True)
@click.option("--ks", type=int, multiple=True, default=(1, 2, 3, 5), show_default=True)
@click.option("--wide-ks", type=int, multiple=True, default=(10, 20, 50, 100), show_default=True)
@click.option("--seeds", type=int, multiple=True, default=(0, 1), show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("docs/topk-stores.json"), show_default=True)
def main(teacher: Path, out: Path, ks: tuple[int, ...], wide_ks: tuple[int, ...], seeds: tuple[int, ...],
         json_out: Path) -> None:
    out, teacher = out.resolve(), teacher.resolve()
    source = IdxSource(FASHION_MNIST_DIR)
    results = {"date": time.strftime("%Y-%m-%d"), "teacher": str(teacher),
               "accuracy": accuracy_by_k(out / "ten-percent", source, teacher, ks, seeds),
               "wide": wide_head(out / "wide", teacher, wide_ks)}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=1) + "\n")
    click.echo(table(results))


def accuracy_by_k(folder: Path, source: IdxSource, teacher: Path, ks: tuple[int, ...], seeds: tuple[int, ...]) -> dict:
    """The demo's 10% setting, its shards drawn as `dho demo` draws them, trained from each store."""
    perm = np.random.default_rng(0).permutation(len(source.labels["train"]))
    student_pool = np.sort(perm[FULL.teacher_pool:])
    shards = folder / "shards"
    if not (shards / MANIFEST).exists():
        items = [Item(("train", int(i)), int(source.labels["train"][i])) for i in student_pool]
        splits = assign_splits(items, source.items("test"), len(source.class_names), percent=10.0,
                               val_per_class=FULL.val_per_class, test_per_class=FULL.test_per_class,
                               max_train_per_class=FULL.unlabelled_per_class, seed=1)
        write_shards(source, splits, shards, shard_size=1000)
    config = experiment_config(folder, shards, teacher, "zero-shot", FULL)
    found = {}
    for k in (None, *ks):
        name = "dense" if k is None else f"top{k}"
        store = cache_teacher.run(load_config(config, [f"cache.top_k={k if k else 'null'}"])).path
        tests = []
        for seed in seeds:
            run_dir = folder / "runs" / f"{name}-seed{seed}"
            settings = [f"cache.top_k={k if k else 'null'}", "train.method=dho", f"train.seed={seed}",
                        f"train.out_dir={run_dir}"]
            if not (run_dir / "final.pt").exists():
                train_student.run(load_config(config, settings), overwrite=True)  # an unfinished attempt starts over
            tests.append(evaluate.run(run_dir / "final.pt")["combined_searched"])
        found[name] = {"k": k, "test": tests, "mean": float(np.mean(tests)), "spread": float(np.ptp(tests)),
                       "logit_bytes_per_view": logit_bytes_per_view(TeacherStore.open(store))}
    return found


def wide_head(folder: Path, teacher: Path, ks: tuple[int, ...]) -> dict:
    """1,000 class names over 2,000 real images: bytes per view and the KL of the top-k completion."""
    names = [*IdxSource(FASHION_MNIST_DIR).class_names, *(f"class {i}" for i in range(10, 1000))]
    source = IdxSource(FASHION_MNIST_DIR, class_names=names)
    shards = folder / "shards"
    if not (shards / MANIFEST).exists():
        unlabelled = source.items("test")[:2000]
        splits = {"labelled": unlabelled[:10], "unlabelled": unlabelled[10:]}
        write_shards(source, splits, shards, shard_size=500)
    config = experiment_config(folder, shards, teacher, "zero-shot", FULL)
    dense_store = TeacherStore.open(cache_teacher.run(load_config(config)).path)
    logits = np.concatenate([dense_store.read_shard(s).logits for s in dense_store.shards()]).astype(np.float32)
    logits = torch.from_numpy(logits.reshape(-1, logits.shape[-1]))
    found = {"classes": len(names), "views": len(logits),
             "dense": {"logit_bytes_per_view": logit_bytes_per_view(dense_store)}}
    for k in ks:
        store = TeacherStore.open(cache_teacher.run(load_config(config, [f"cache.top_k={k}"])).path)
        kl = completion_kl(logits, k, TEMPERATURE)
        found[f"top{k}"] = {"k": k, "logit_bytes_per_view": logit_bytes_per_view(store),
                            "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
                            "teacher_mass_in_top_k": float(logits.softmax(-1).topk(k).values.sum(-1).mean())}
    return {**found, "manifest_rows": load_manifest(shards).num_rows}


def completion_kl(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """KL(p_T || p~_T) per view: p the dense teacher at T = 1; p~ its k largest probabilities, exact, and the
    rest of the mass spread evenly over the other classes; both tempered as the KD loss tempers them."""
    p = logits.softmax(-1)
    top = p.topk(k, dim=-1)
    rest = (1 - top.values.sum(-1, keepdim=True)).clamp(min=0) / (p.shape[-1] - k)
    completion = rest.expand_as(p).clone().scatter(-1, top.indices, top.values)
    log_p = (p.log() / temperature).log_softmax(-1)
    log_c = (completion.clamp(min=1e-30).log() / temperature).log_softmax(-1)
    return torch.where(torch.isneginf(log_p), 0.0, log_p.exp() * (log_p - log_c)).sum(-1)  # 0 log 0 = 0


def logit_bytes_per_view(store: TeacherStore) -> float:
    """Bytes on disk of the teacher-output arrays over the views computed (val/test rows hold one view)."""
    size = sum(f.stat().st_size for name in LOGIT_ARRAYS if (store.path / name).is_dir()
               for f in (store.path / name).rglob("*") if f.is_file())
    views = sum(s.count * (1 if s.split in ("val", "test") else store.num_views) for s in store.shards())
    return size / views


def table(results: dict) -> str:
    lines = ["| store | logit bytes / view | DHO test top-1 (seeds) |", "|---|---|---|"]
    for name, r in results["accuracy"].items():
        lines.append(f"| {name} | {r['logit_bytes_per_view']:.1f} | {r['mean']:.4f} ±{r['spread'] / 2:.4f} "
                     f"({', '.join(f'{t:.4f}' for t in r['test'])}) |")
    wide = results["wide"]
    lines += ["", f"{wide['classes']} classes, {wide['views']} views:", "",
              "| store | logit bytes / view | teacher mass in top k | KL(p_T ‖ top-k completion), mean / p99 |",
              "|---|---|---|---|", f"| dense | {wide['dense']['logit_bytes_per_view']:.1f} | 1 | 0 |"]
    for name, r in wide.items():
        if isinstance(r, dict) and "kl_mean" in r:
            lines.append(f"| {name} | {r['logit_bytes_per_view']:.1f} | {r['teacher_mass_in_top_k']:.3f} | "
                         f"{r['kl_mean']:.2e} / {r['kl_p99']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
