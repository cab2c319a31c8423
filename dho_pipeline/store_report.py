"""What `dho cache inspect` and `dho cache list` report about a store, computed from the store alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dho_pipeline.store import TeacherStore
from dho_pipeline.views import CLEAN_VIEW

UNLABELLED_SAMPLE = 10_000  # unlabelled rows the teacher's accuracy is reported on (the split can be huge)


def teacher_accuracy(store: TeacherStore, split_rows: np.ndarray) -> dict[str, float | None]:
    """Top-1 of the stored logits on a split's finished rows: clean view, and all cached random views."""
    rows = np.sort(split_rows)
    none = {"clean": None, "views": None, "zero_shot": None}
    if len(rows) == 0:
        return none

    def read(name: str, at: np.ndarray) -> np.ndarray:
        """Array `name` at sorted rows `at`, in one read of the span they cover."""
        return store.group[name][at[0]: at[-1] + 1][at - at[0]]

    keep = rows[read("done", rows) & ~read("bad", rows)]
    if len(keep) == 0:
        return none
    logits = read("logits", keep).astype(np.float32)
    labels = read("labels", keep).astype(np.int64)
    clean = float((logits[:, CLEAN_VIEW].argmax(-1) == labels).mean())
    zero_shot = None
    if "zero_shot" in store.group:
        zero_shot = float((read("zero_shot", keep).astype(np.float32).argmax(-1) == labels).mean())
    random_views = logits[:, CLEAN_VIEW + 1:]
    computed = ~np.isnan(random_views).any(-1)
    hits = (random_views.argmax(-1) == labels[:, None]) & computed
    views = float(hits.sum() / computed.sum()) if computed.any() else None
    return {"clean": clean, "views": views, "zero_shot": zero_shot}


def summarize(path: Path) -> dict:
    """Size, progress, fingerprint and teacher accuracy per split of the store at `path`."""
    store = TeacherStore.open(path)
    splits = store.split_rows()
    valid = np.concatenate(list(splits.values())) if splits else np.zeros(0, int)
    done = store.group["done"][:]
    rows, views = len(valid), store.num_views
    size = store.bytes_on_disk()
    # Unlabelled labels are kept for reporting only; its first rows are a fair sample at any dataset size.
    accuracy = {split: teacher_accuracy(store, r[:UNLABELLED_SAMPLE] if split == "unlabelled" else r)
                for split, r in splits.items()}
    teacher = store.fingerprint["teacher"]
    return {
        "path": str(store.path),
        "rows": rows,
        "views": views,
        "classes": store.num_classes,
        "dtype": str(store.group["logits"].dtype),
        "bytes_on_disk": size,
        "bytes_per_view": size / max(1, rows * views),
        "done_fraction": float(done[valid].mean()) if rows else 0.0,
        "bad_rows": int(store.group["bad"][:].sum()),
        "split_rows": {split: len(r) for split, r in splits.items()},
        "teacher": f"{teacher['model']} ({teacher['pretrained']}, {teacher['head']})",
        "fingerprint": store.attrs["fingerprint_hash"],
        "fingerprint_fields": store.fingerprint,
        "teacher_accuracy": {split: acc["clean"] for split, acc in accuracy.items()},
        "teacher_view_accuracy": {split: acc["views"] for split, acc in accuracy.items()},
        "teacher_zero_shot_accuracy": {split: acc["zero_shot"] for split, acc in accuracy.items()},
    }


def list_stores(root: Path) -> list[dict]:
    """A short summary of every store directly under `root` (unreadable ones say why)."""
    found = []
    for path in sorted(Path(root).glob("*.zarr")):
        try:
            s = summarize(path)
            found.append({k: s[k] for k in ("path", "teacher", "classes", "views", "rows", "done_fraction",
                                             "bytes_on_disk")})
        except (OSError, ValueError, KeyError) as e:
            found.append({"path": str(path), "error": str(e)})
    return found
