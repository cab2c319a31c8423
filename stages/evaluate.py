"""Evaluate a trained student: alpha/beta search on val, top-1 on test and on extra shard sets."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch

from dho_pipeline.config import EvalConfig
from dho_pipeline.data.shards import MANIFEST, Manifest, Shard, ShardDataError, load_manifest
from dho_pipeline.data.student_stream import clean_batches
from dho_pipeline.data.views import CLEAN_VIEW
from dho_pipeline.errors import warn
from dho_pipeline.locations import Location, UrlPath, location
from dho_pipeline.runtime import pick_device
from dho_pipeline.store.zarr_store import TeacherStore
from dho_pipeline.student.evaluation import HeadOutputs, accuracy, combine, head_outputs, restrict, search_alpha_beta
from dho_pipeline.student.from_checkpoint import load_student


def extra_set(name: str, pattern: str, class_names: list[str]) -> tuple[list[Shard], list[int] | None]:
    """An extra test set's shards, and the classes it covers when it covers only some (None: every class).

    A folder of make-shards gives its test split, checked against its manifest; a set made with --test-only
    covers the training classes its manifest lists. A glob pattern gives its tar files, unchecked (no manifest).
    """
    where = location(pattern)
    if (where / MANIFEST).is_file():
        manifest = load_manifest(where)
        if manifest.class_names != class_names:
            if sorted(manifest.class_names) == sorted(class_names):
                pairs = zip(manifest.class_names, class_names, strict=True)
                first = next(i for i, (a, b) in enumerate(pairs) if a != b)
                what = (f"the student's {len(class_names)} classes in another order (index {first}: "
                        f"{manifest.class_names[first]!r}, the student's {class_names[first]!r})")
            else:
                what = f"other classes than the student ({len(manifest.class_names)} against {len(class_names)})"
            raise ShardDataError(f"--shards {name}={pattern}: {manifest.root / MANIFEST} has {what}; make the set "
                                 "with --test-only --train-shards <the student's shards>")
        shards = manifest.splits.get("test", [])
        if not shards:
            raise ShardDataError(f"--shards {name}={pattern}: {manifest.root / MANIFEST} has no test split")
        manifest.check_files(shards)
        covers = manifest.info.get("covers")
        return shards, None if covers is None else [class_names.index(c) for c in covers]
    paths = where.expand() if isinstance(where, UrlPath) else [Path(p) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise FileNotFoundError(f"--shards {name}={pattern}: no files match, and it is no folder of make-shards")
    return [Shard(name, p, -1, 0, "", num_classes=len(class_names)) for p in paths], None


def trained_store(state: dict) -> TeacherStore | None:
    """The store the student was trained from, when it is at hand: one missing from its path, or found there with
    another fingerprint, is named and left out (None)."""
    store_path, fingerprint = state.get("store"), state.get("store_fingerprint")
    if not store_path:
        return None
    if not location(store_path).exists():
        warn(f"{store_path}: the store this student was trained from is not there: its teacher accuracy is left out")
        return None
    store = TeacherStore.open(store_path)
    found = store.attrs["fingerprint_hash"]
    if fingerprint and found != fingerprint:
        warn(f"{store_path}: not the store this student was trained from (fingerprint {found[:12]}, trained from "
             f"{fingerprint[:12]}): its teacher accuracy is left out")
        return None
    return store


def teacher_accuracy(store: TeacherStore, shards: list[Shard], out: HeadOutputs) -> float:
    """The cached teacher's top-1 on the same rows as `out` (clean view, checked reads)."""
    rows = np.concatenate([np.asarray(s.rows) for s in shards])
    predictions = np.concatenate([store.read_shard(s).predictions()[:, CLEAN_VIEW] for s in shards])
    return float((torch.from_numpy(predictions[np.searchsorted(rows, out.rows.numpy())]) == out.labels).float().mean())


def run_manifest(checkpoint: Path, state: dict, moved_to: Location | str | None) -> Manifest:
    """The manifest of the shards the run trained on: where final.pt says, or at `moved_to`, which must hold the
    same data (the shards' fingerprint the checkpoint keeps)."""
    if moved_to is None:
        if not (location(state["shards"]) / MANIFEST).exists():
            raise FileNotFoundError(f"{state['shards']}: the shards {checkpoint} was trained on are not there (moved "
                                    "or on another machine?): give their folder with --run-shards DIR")
        return load_manifest(state["shards"])
    manifest = load_manifest(moved_to)
    trained_on = state.get("shards_fingerprint")
    if trained_on and manifest.fingerprint_hash() != trained_on:
        raise ShardDataError(f"--run-shards {moved_to}: not the shards {checkpoint} was trained on (shard fingerprint "
                             f"{manifest.fingerprint_hash()}, trained on {trained_on}); to score other images, give "
                             "them as an extra set: --shards NAME=DIR")
    return manifest


def report(out: HeadOutputs, alpha: float, beta: float, default_alpha: float, default_beta: float) -> dict:
    return {
        "ce_head": accuracy(out.ce, out.labels),
        "kd_head": accuracy(out.kd, out.labels),
        "combined_default": accuracy(combine(out.ce, out.kd, default_alpha, default_beta), out.labels),
        "combined_searched": accuracy(combine(out.ce, out.kd, alpha, beta), out.labels),
        "images": len(out.labels),
    }


def run(checkpoint: Path, extra: dict[str, str] | None = None, device: str = "auto",
        run_shards: Location | str | None = None) -> dict:
    """Search alpha/beta on val, then report every head and combination on test and the extra sets (a test-only set
    over the classes it covers). `run_shards`: where the run's own shards are now, if they moved."""
    dev = pick_device(device, "--device")
    student = load_student(checkpoint, dev)
    cfg = EvalConfig(**student.checkpoint["config"]["eval"])
    manifest = run_manifest(checkpoint, student.checkpoint, run_shards)
    if not manifest.splits.get("test"):
        raise ShardDataError(f"{manifest.root}: no test split to evaluate on (make-shards --test-per-class N, or a "
                             "test/ folder in the source)")
    manifest.check_files(manifest.shards(("val", "test")))

    skip_bad = student.checkpoint["config"]["data"].get("on_bad_image") == "skip"  # as the run was trained
    store = trained_store(student.checkpoint)
    bad_rows = store.bad_rows(manifest.shards(("val", "test"))) if store else frozenset()  # left out, as in training

    def outputs(shards: list[Shard], bad: frozenset[int] = frozenset()) -> HeadOutputs:
        batches = clean_batches(shards, student.data.image_size, cfg.batch_size, skip_bad=skip_bad, bad_rows=bad)
        return head_outputs(student.model, batches, student.data, dev)

    method = student.checkpoint.get("method", "dho")
    single_head = method != "dho"  # CE-only and single-head KD train the CE head alone: alpha = 1, no search
    default_alpha = 1.0 if single_head else cfg.default_alpha
    alpha, beta = default_alpha, cfg.default_beta
    result: dict = {"method": method}
    if manifest.splits.get("val"):
        val = outputs(manifest.splits["val"], bad_rows)
        if single_head:
            result["val_combined_searched"] = accuracy(val.ce, val.labels)
        else:
            alpha, beta, result["val_combined_searched"] = search_alpha_beta(val, cfg.alpha_grid, cfg.beta_grid)
    test = outputs(manifest.splits["test"], bad_rows)
    result.update(report(test, alpha, beta, default_alpha, cfg.default_beta))
    result.update(alpha=alpha, beta=beta,
                  teacher=None if store is None else teacher_accuracy(store, manifest.splits["test"], test))
    result["extra"] = {}
    for name, pattern in (extra or {}).items():
        shards, classes = extra_set(name, pattern, student.class_names)
        out = outputs(shards) if classes is None else restrict(outputs(shards), classes)
        scores = report(out, alpha, beta, default_alpha, cfg.default_beta)
        result["extra"][name] = scores if classes is None else {**scores, "classes": len(classes)}
    return result
