"""The Zarr teacher-logit store: created from a fingerprint, written one shard (= one chunk) at a time.

Layout (rows = the manifest's row space, chunk = one shard along rows):
  logits (rows, 1+K, C) float16  teacher logits per view; NaN where not computed
  boxes  (rows, 1+K, 4) float32  crop box per view, fractions (x0, y0, w, h) of the image
  flips  (rows, 1+K)    bool     horizontal flip per view
  labels (rows,)        int16    class index (-1 outside any shard), for reporting only
  bad    (rows,)        bool     image could not be decoded and was skipped
  done   (rows,)        bool     written; a restart skips shards whose rows are all done
  zero_shot (rows, C)   float16  adapted teachers only: the clean view's zero-shot logits
attributes: format, fingerprint, fingerprint_hash, class_names, splits (row ranges of each shard).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from dho_pipeline.errors import DhoError
from dho_pipeline.shards import Manifest, Shard

STORE_FORMAT = "dho-teacher-store/1"
ARRAYS = ("logits", "boxes", "flips", "labels", "bad", "done")


class StoreMismatch(DhoError, ValueError):
    """An existing store was made from other settings than the ones asked for."""


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def fingerprint_diff(stored: dict, expected: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ (two levels deep: `teacher.checkpoint_sha256`)."""
    fields = []
    for key in sorted(set(stored) | set(expected)):
        a, b = stored.get(key), expected.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            fields += fingerprint_diff(a, b, f"{key}.")
        else:
            fields.append(prefix + key)
    return fields


def default_store_path(root: Path, fingerprint: dict) -> Path:
    """<root>/<teacher model>-<12 hex of the fingerprint>.zarr: same settings, same store."""
    model = str(fingerprint["teacher"]["model"]).replace("/", "_").replace(":", "_")
    return Path(root) / f"{model}-{fingerprint_hash(fingerprint)[:12]}.zarr"


@dataclass
class ShardRows:
    """One shard's slice of the store, read in one chunk read per array."""

    logits: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray
    labels: np.ndarray
    bad: np.ndarray
    done: np.ndarray


class TeacherStore:
    """A Zarr group of teacher outputs keyed by global row id."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def fingerprint(self) -> dict:
        return self.attrs["fingerprint"]

    @property
    def num_views(self) -> int:
        return self.group["logits"].shape[1]

    @property
    def num_classes(self) -> int:
        return self.group["logits"].shape[2]

    @property
    def num_rows(self) -> int:
        return self.group["logits"].shape[0]

    @classmethod
    def create(cls, path: Path, fingerprint: dict, manifest: Manifest, num_views: int,
               with_zero_shot: bool = False) -> TeacherStore:
        path = Path(path)
        group = zarr.open_group(str(path), mode="w")
        rows, chunk, classes = manifest.num_rows, manifest.shard_size, len(manifest.class_names)
        specs = {
            "logits": ((rows, num_views, classes), "float16", np.nan),
            "boxes": ((rows, num_views, 4), "float32", 0.0),
            "flips": ((rows, num_views), "bool", False),
            "labels": ((rows,), "int16", -1),
            "bad": ((rows,), "bool", False),
            "done": ((rows,), "bool", False),
        }
        if with_zero_shot:
            specs["zero_shot"] = ((rows, classes), "float16", np.nan)
        for name, (shape, dtype, fill) in specs.items():
            group.create_array(name, shape=shape, chunks=(chunk,) + shape[1:], dtype=dtype, fill_value=fill)
        group.attrs.update({
            "format": STORE_FORMAT,
            "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
            "class_names": manifest.class_names,
            "splits": {split: [[s.first_row, s.count] for s in shards] for split, shards in manifest.splits.items()},
        })
        return cls(path, group)

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> TeacherStore:
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(f"{path}: no teacher store here (run `dho cache-teacher` first)")
        group = zarr.open_group(str(path), mode=mode)
        if group.attrs.get("format") != STORE_FORMAT:
            raise ValueError(f"{path}: not a dho teacher store (format {group.attrs.get('format')!r})")
        return cls(path, group)

    @classmethod
    def open_or_create(cls, path: Path, fingerprint: dict, manifest: Manifest, num_views: int,
                       overwrite: bool = False, with_zero_shot: bool = False) -> TeacherStore:
        """Reuse a store made from the same fingerprint, refuse another one unless `overwrite`."""
        path = Path(path)
        if (path / "zarr.json").exists():
            store = cls.open(path, mode="a")
            if store.fingerprint == fingerprint:
                return store
            if not overwrite:
                store.check_fingerprint(fingerprint)
            shutil.rmtree(path)
        return cls.create(path, fingerprint, manifest, num_views, with_zero_shot)

    def check_fingerprint(self, expected: dict) -> None:
        """Raise StoreMismatch naming every field where this store differs from `expected`."""
        fields = fingerprint_diff(self.fingerprint, expected)
        if fields:
            raise StoreMismatch(
                f"{self.path}: made with other settings; fields that differ: {', '.join(fields)}. "
                "Use another cache.store, or rerun `dho cache-teacher --overwrite` to replace it."
            )

    def shard_done(self, shard: Shard) -> bool:
        return bool(self.group["done"][shard.first_row: shard.first_row + shard.count].all())

    def write_shard(self, shard: Shard, logits: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                    labels: np.ndarray, bad: np.ndarray, zero_shot: np.ndarray | None = None) -> None:
        """Write one shard's rows (one chunk), then mark them done: a crash in between only redoes it."""
        rows = slice(shard.first_row, shard.first_row + shard.count)
        self.group["logits"][rows] = logits.astype(np.float16)
        if zero_shot is not None:
            self.group["zero_shot"][rows] = zero_shot.astype(np.float16)
        self.group["boxes"][rows] = boxes
        self.group["flips"][rows] = flips
        self.group["labels"][rows] = labels
        self.group["bad"][rows] = bad
        self.group["done"][rows] = True

    def read_shard(self, shard: Shard) -> ShardRows:
        rows = slice(shard.first_row, shard.first_row + shard.count)
        return ShardRows(*(self.group[name][rows] for name in ARRAYS))

    def split_rows(self) -> dict[str, np.ndarray]:
        """The row ids of every split, from the store's own attributes."""
        return {
            split: np.concatenate([np.arange(a, a + n) for a, n in ranges] or [np.zeros(0, int)])
            for split, ranges in self.attrs["splits"].items()
        }

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def build_fingerprint(teacher: dict, views: dict, manifest: Manifest) -> dict:
    """Everything the cached logits depend on: teacher, class names, view recipe and the shards."""
    fingerprint = {
        "format": STORE_FORMAT,
        "teacher": teacher,
        "class_names": list(manifest.class_names),
        "views": views,
        "shards": manifest.fingerprint(),
    }
    return json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
