"""What `dho cache inspect`, `list` and `verify` report about a store, computed from the store alone (and, to name
bad images' source files, the shard set it was made from)."""

from __future__ import annotations

import numpy as np

from dho_pipeline.data.shards import Manifest, Shard, ShardDataError, sample_key, source_file
from dho_pipeline.data.views import CLEAN_VIEW
from dho_pipeline.errors import one_line
from dho_pipeline.locations import Location, location
from dho_pipeline.store.zarr_store import NOT_DONE, StoreError, StoreShard, TeacherStore, stores_under

UNLABELLED_SAMPLE = 10_000  # unlabelled rows the teacher's accuracy is reported on (the split can be huge)
LISTED_BAD_IMAGES = 20  # bad images `cache inspect` names by shard and key; the rest are counted


def teacher_accuracy(store: TeacherStore, shards: list[StoreShard], limit: int | None = None
                     ) -> dict[str, float | None]:
    """Top-1 of the stored logits on (the first `limit` rows of) intact shards: clean view, and all random views."""
    predictions, labels, zero_shot = [], [], []
    for shard in shards:
        if limit is not None and sum(len(x) for x in labels) >= limit:
            break
        rows = store.read_shard(shard)
        keep = ~rows.bad
        predictions.append(rows.predictions()[keep])
        labels.append(rows.labels[keep].astype(np.int64))
        if "zero_shot" in store.group:
            zero_shot.append(store.group["zero_shot"][shard.first_row: shard.first_row + shard.count][keep])
    if not labels or not sum(len(x) for x in labels):
        return {"clean": None, "views": None, "zero_shot": None}
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    clean = float((predictions[:, CLEAN_VIEW] == labels).mean())
    adapted = None
    if zero_shot:
        adapted = float((np.concatenate(zero_shot).astype(np.float32).argmax(-1) == labels).mean())
    random_views = predictions[:, CLEAN_VIEW + 1:]
    computed = random_views >= 0
    hits = (random_views == labels[:, None]) & computed
    views = float(hits.sum() / computed.sum()) if computed.any() else None
    return {"clean": clean, "views": views, "zero_shot": adapted}


def teacher_name(store: TeacherStore) -> str:
    teacher = store.fingerprint["teacher"]
    return f"{teacher['model']} ({teacher['pretrained']}, {teacher['head']})"


def verify(store: TeacherStore, progress: bool = False) -> dict:
    """Every shard checked against its checksums: intact, damaged (with what is wrong), not computed yet."""
    checks = store.check_shards(progress=progress)
    return {
        "path": str(store.path),
        "shards": len(checks),
        "intact": [s.name for s, problem in checks.items() if problem is None],
        "damaged": {s.name: problem for s, problem in checks.items() if problem not in (None, NOT_DONE)},
        "not_computed": [s.name for s, problem in checks.items() if problem == NOT_DONE],
    }


def made_from(store: TeacherStore, manifest: Manifest) -> dict[str, Shard]:
    """The manifest's shards by name; ShardDataError unless it holds every shard the store was made from."""
    held = manifest.fingerprint()
    other = [name for name, *rest in store.fingerprint["shards"] if [name, *rest] not in held]
    if other:
        raise ShardDataError(f"{manifest.root}: not the shard set {store.path} was made from ({len(other)} of its "
                             f"shards missing or other files, {other[0]} first)")
    return {shard.path.name: shard for shard in manifest.shards()}


def bad_image(shard_name: str, row: int, shard_set: dict[str, Shard]) -> dict[str, str]:
    """A bad image by shard and key, and by the file make-shards read it from when the shard set knows it."""
    entry = {"shard": shard_name, "key": sample_key(row)}
    shard = shard_set.get(shard_name)
    source = source_file(shard, row - shard.first_row) if shard else None
    return {**entry, "source": source} if source else entry


def summarize(path: Location, progress: bool = False, manifest: Manifest | None = None) -> dict:
    """Size, progress, integrity, fingerprint and teacher accuracy per split of the store at `path`.

    Every shard is verified; progress (`done_fraction`), accuracies and the bad images skipped (the first
    LISTED_BAD_IMAGES by shard and key, and by source file when `manifest`, the store's shard set, has a
    sources.json) count intact shards only.
    """
    store = TeacherStore.open(path)
    shard_set = made_from(store, manifest) if manifest else {}
    checks = store.check_shards(progress=progress)
    intact = [s for s, problem in checks.items() if problem is None]
    rows, views = sum(s.count for s in checks), store.num_views
    size = store.bytes_on_disk()
    splits = list(store.attrs["splits"])
    # Unlabelled labels are kept for reporting only; its first rows are a fair sample at any dataset size.
    accuracy = {split: teacher_accuracy(store, [s for s in intact if s.split == split],
                                        UNLABELLED_SAMPLE if split == "unlabelled" else None) for split in splits}
    bad = [(s.name, s.first_row + int(i)) for s in intact for i in np.flatnonzero(store.shard_flags(s)[1])]
    return {
        "path": str(store.path),
        "rows": rows,
        "views": views,
        "classes": store.num_classes,
        "dtype": (f"top-{store.top_k} ({store.group['top_values'].dtype} values, "
                  f"{store.group['top_indices'].dtype} classes, float32 log-sum-exp)") if store.top_k
        else str(store.group["logits"].dtype),
        "bytes_on_disk": size,
        "bytes_per_view": size / max(1, rows * views),
        "done_fraction": sum(s.count for s in intact) / rows if rows else 0.0,
        "damaged_shards": {s.name: problem for s, problem in checks.items() if problem not in (None, NOT_DONE)},
        "bad_rows": len(bad),
        "bad_images": [bad_image(name, row, shard_set) for name, row in bad[:LISTED_BAD_IMAGES]],
        "bad_images_not_listed": max(0, len(bad) - LISTED_BAD_IMAGES),
        "split_rows": {split: int(sum(s.count for s in checks if s.split == split)) for split in splits},
        "teacher": teacher_name(store),
        "fingerprint": store.attrs["fingerprint_hash"],
        "fingerprint_fields": store.fingerprint,
        "teacher_accuracy": {split: acc["clean"] for split, acc in accuracy.items()},
        "teacher_view_accuracy": {split: acc["views"] for split, acc in accuracy.items()},
        "teacher_zero_shot_accuracy": {split: acc["zero_shot"] for split, acc in accuracy.items()},
    }


def list_stores(root: Location) -> list[dict]:
    """A short summary of every store directly under `root`, from its done marks and its list of chunk files.

    A shard marked done with a chunk file missing counts as damaged, not done; a chunk present but damaged
    is found by inspect and verify only (they read every chunk).
    """
    found = []
    for path in stores_under(location(root)):
        try:
            store = TeacherStore.open(path)
            shards = store.shards()
            rows = sum(s.count for s in shards)
            marked = [s for s in shards if store.shard_done(s)]
            damaged = store.missing_chunk_files(marked)
            done = sum(s.count for s in marked if s not in damaged)
            found.append({"path": str(path), "teacher": teacher_name(store), "classes": store.num_classes,
                          "views": store.num_views, "top_k": store.top_k,  # None: every logit
                          "rows": rows, "done_fraction": done / rows if rows else 0.0,
                          "damaged_shards": {s.name: problem for s, problem in damaged.items()},
                          "bytes_on_disk": store.bytes_on_disk()})
        except (StoreError, FileNotFoundError) as e:
            found.append({"path": str(path), "error": one_line(e).removeprefix(f"{path}: ")})
    return found
