"""The Zarr teacher-logit store: created atomically from a fingerprint, written one shard (= one chunk) at a time.

Layout (rows = the manifest's row space, chunk = one shard along rows):
  logits (rows, 1+K, C) float16  teacher logits per view; NaN where not computed (dense stores)
  top_values  (rows, 1+K, k) float16   top-k stores (cache.top_k): each view's k largest logits, descending,
  top_indices (rows, 1+K, k) int16/32  their classes (-1 where not computed),
  lse         (rows, 1+K)    float32   and the log-sum-exp of all C logits, so their probabilities are exact
  boxes  (rows, 1+K, 4) float32  crop box per view, fractions (x0, y0, w, h) of the image
  flips  (rows, 1+K)    bool     horizontal flip per view
  labels (rows,)        int16    class index (-1 outside any shard), for reporting only
  bad    (rows,)        bool     image could not be decoded and was skipped
  done   (rows,)        bool     written and checksummed; a restart skips shards whose rows are all done
  zero_shot (rows, C)   float16  adapted teachers only: the clean view's zero-shot logits
  checksums (chunks, A) uint32   per shard, the CRC-32 of each checked array's rows, written just before `done`
attributes: format, fingerprint, fingerprint_hash, class_names, splits (row ranges of each shard), checked
(the arrays `checksums` covers, in column order), top_k (null for dense stores), request.

A shard's rows are trusted only when `done` and every checked array matches its checksum: a chunk that is
missing (read back as fill), truncated or overwritten is found, named, and recomputed by stage one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shlex
import shutil
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from tqdm import tqdm

from dho_pipeline.atomic_write import flush_to_disk
from dho_pipeline.data.shards import Manifest, Shard
from dho_pipeline.errors import DhoError, disk_full, is_disk_full, one_line
from dho_pipeline.locations import STORAGE_OPTIONS, Location, LocationError, UrlPath, location

STORE_FORMAT = "dho-teacher-store/2"  # dense logits
TOPK_STORE_FORMAT = "dho-teacher-store/3"  # top-k logits (cache.top_k)
DENSE_LOGITS = ("logits",)
TOPK_LOGITS = ("top_values", "top_indices", "lse")
FIELD_LIMIT = 80  # characters of a fingerprint value an error shows
VERIFY_THREADS = 8  # reads and checksums overlap; zarr's codecs and zlib release the GIL
VIEW_ARRAYS = ("boxes", "flips", "labels", "bad")  # checked after the logit arrays; + zero_shot when present


class StoreError(DhoError):
    """A store is missing, unreadable or damaged; the message names the store and, where known, array and shard."""


class FolderOfStores(StoreError, FileNotFoundError):
    """A folder that holds stores (a cache root) given where one store is meant; never replaced, not even
    by --overwrite."""


class StoreMismatch(StoreError, ValueError):
    """An existing store was made from other settings than the ones asked for."""

    @classmethod
    def of(cls, path: Location | str, fields: list[str], remedy: str) -> StoreMismatch:
        """The error naming each differing field with both values (described_diff), then what to do."""
        error = cls(f"{path}: made with other settings; fields that differ: {'; '.join(fields)}. {remedy}")
        error.path, error.fields = path, fields
        return error


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


def described_diff(stored: dict, expected: dict) -> list[str]:
    """Each differing field (fingerprint_diff) with both values: 'views.ratio: store [...] vs config [...]'; of a
    list too long to show whole (the shards), its first differing entry: 'shards[5]: store [...] vs config [...]'."""
    described = []
    for name in fingerprint_diff(stored, expected):
        a, b = _field(stored, name), _field(expected, name)
        if isinstance(a, list) and isinstance(b, list) and len(repr(a)) + len(repr(b)) > 2 * FIELD_LIMIT:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            counts = f" ({len(a)} entries vs {len(b)})" if len(a) != len(b) else ""
            entry_a, entry_b = (_shortened(v[first]) if first < len(v) else "nothing" for v in (a, b))
            described.append(f"{name}[{first}]: store {entry_a} vs config {entry_b}{counts}")
        else:
            described.append(f"{name}: store {field_value(stored, name)} vs config {field_value(expected, name)}")
    return described


def field_value(fingerprint: dict, name: str) -> str:
    """The value of dotted field `name`, shortened to FIELD_LIMIT characters."""
    return _shortened(_field(fingerprint, name))


def _field(fingerprint: dict, name: str) -> object:
    value: object = fingerprint
    for key in name.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _shortened(value: object) -> str:
    text = repr(value)
    return text if len(text) <= FIELD_LIMIT else text[: FIELD_LIMIT - 1] + "…"


def default_store_path(root: Location, fingerprint: dict) -> Location:
    """<root>/<teacher model>-<12 hex of the fingerprint>.zarr: same settings, same store."""
    model = str(fingerprint["teacher"]["model"]).replace("/", "_").replace(":", "_")
    return location(root) / f"{model}-{fingerprint_hash(fingerprint)[:12]}.zarr"


def digest(values: np.ndarray) -> int:
    """CRC-32 of an array's bytes as stored (dtype, C order): 2.5 GB/s here, 4x BLAKE2b, and ample to catch
    damage (benchmarks/integrity_cost.py)."""
    return zlib.crc32(np.ascontiguousarray(values).data)


@dataclass(frozen=True)
class ArrayLayout:
    """Shape, chunks, dtype and fill value of one array of a store."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    fill_value: object


@dataclass(frozen=True)
class StoreShard:
    """A shard as the store knows it (from its fingerprint): enough to name and find its rows."""

    split: str
    name: str
    first_row: int
    count: int


@dataclass
class ShardRows:
    """One shard's slice of the store, read in one chunk read per array: dense logits or top-k rows."""

    boxes: np.ndarray
    flips: np.ndarray
    labels: np.ndarray
    bad: np.ndarray
    done: np.ndarray
    logits: np.ndarray | None = None  # dense stores
    top_values: np.ndarray | None = None  # top-k stores
    top_indices: np.ndarray | None = None
    lse: np.ndarray | None = None

    @property
    def num_views(self) -> int:
        return self.boxes.shape[1]

    def teacher_row(self, position: int, view: int) -> dict[str, torch.Tensor]:
        """One view's teacher output as stage two's stream carries it (fp32; int64 class indices)."""
        if self.logits is not None:
            return {"teacher_logits": torch.from_numpy(self.logits[position, view].astype(np.float32))}
        return {"teacher_top_values": torch.from_numpy(self.top_values[position, view].astype(np.float32)),
                "teacher_top_indices": torch.from_numpy(self.top_indices[position, view].astype(np.int64)),
                "teacher_lse": torch.tensor(float(self.lse[position, view]))}

    def predictions(self) -> np.ndarray:
        """The teacher's top-1 class of every row and view (rows, 1+K); -1 where not computed."""
        if self.logits is not None:
            computed = ~np.isnan(self.logits).any(-1)
            return np.where(computed, np.nan_to_num(self.logits.astype(np.float32), nan=0).argmax(-1), -1)
        return np.where(np.isnan(self.lse), -1, self.top_indices[..., 0].astype(np.int64))


class TeacherStore:
    """A Zarr group of teacher outputs keyed by global row id."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path = location(path)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        """One array of the store, its metadata read once (on an object store, a GET each time otherwise)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def fingerprint(self) -> dict:
        return self.attrs["fingerprint"]

    @property
    def num_views(self) -> int:
        return self.array("boxes").shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.attrs["class_names"])

    @property
    def num_rows(self) -> int:
        return self.array("boxes").shape[0]

    @property
    def top_k(self) -> int | None:
        """k of a top-k store; None for a dense one."""
        return self.attrs.get("top_k")

    @property
    def arrays(self) -> tuple[str, ...]:
        return (*(TOPK_LOGITS if self.top_k else DENSE_LOGITS), *VIEW_ARRAYS, "done")

    @property
    def checked(self) -> list[str]:
        return list(self.attrs["checked"])

    @classmethod
    def create(cls, path: Location, fingerprint: dict, manifest: Manifest, num_views: int,
               with_zero_shot: bool = False, request: str | None = None, top_k: int | None = None) -> TeacherStore:
        """Build the store beside `path` and rename it into place: a kill leaves nothing or a whole store.

        `request` is the hash of the config that asked for it (lookup.stage_one_request), so a rerun
        of that config can find the finished store without building the teacher. `top_k` keeps each view's k
        largest logits (see the module docstring). Call with the store's write lock held (lock.py);
        `path` must not exist.
        """
        rows, chunk, classes = manifest.num_rows, manifest.shard_size, len(manifest.class_names)
        logit_arrays = TOPK_LOGITS if top_k else DENSE_LOGITS
        checked = [*logit_arrays, *VIEW_ARRAYS] + (["zero_shot"] if with_zero_shot else [])
        specs = {
            "logits": ((rows, num_views, classes), "float16", np.nan),
            "top_values": ((rows, num_views, top_k), "float16", np.nan),
            "top_indices": ((rows, num_views, top_k), "int16" if classes <= 32767 else "int32", -1),
            "lse": ((rows, num_views), "float32", np.nan),
            "boxes": ((rows, num_views, 4), "float32", 0.0),
            "flips": ((rows, num_views), "bool", False),
            "labels": ((rows,), "int16", -1),
            "bad": ((rows,), "bool", False),
            "done": ((rows,), "bool", False),
        }
        if with_zero_shot:
            specs["zero_shot"] = ((rows, classes), "float16", np.nan)
        layout = {name: ArrayLayout(shape, (chunk,) + shape[1:], dtype, fill)
                  for name, (shape, dtype, fill) in specs.items() if name in (*checked, "done")}
        layout["checksums"] = ArrayLayout((-(-rows // chunk), len(checked)), (1, len(checked)), "uint32", 0)
        return cls._build(path, layout, {
            "format": TOPK_STORE_FORMAT if top_k else STORE_FORMAT,
            "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
            "class_names": manifest.class_names,
            "splits": {split: [[s.first_row, s.count] for s in shards] for split, shards in manifest.splits.items()},
            "checked": checked,
            "request": request,
            "top_k": top_k,
        })

    @classmethod
    def create_like(cls, source: TeacherStore, path: Location) -> TeacherStore:
        """An empty store at `path` with the arrays and attributes of `source` (`dho cache copy`)."""
        return cls._build(path, source.layout(), source.attrs)

    def layout(self) -> dict[str, ArrayLayout]:
        return {name: ArrayLayout(a.shape, a.chunks, str(a.dtype), a.fill_value) for name, a in self.group.arrays()}

    @classmethod
    def _build(cls, path: Location, layout: dict[str, ArrayLayout], attrs: dict) -> TeacherStore:
        """Create the arrays and attributes beside `path`, then publish them there whole (see `_publish`)."""
        path = store_location(path)
        for leftover in path.parent.glob(f"{path.name}.creating-*"):  # from writers killed while creating
            with contextlib.suppress(OSError):
                _remove(leftover)
        if path.exists() and interrupted_creation(path):
            _remove(path)
        building = path.with_name(f"{path.name}.creating-{uuid.uuid4().hex[:8]}")
        group = _zarr_group(building, mode="w")
        for name, array in layout.items():
            group.create_array(name, shape=array.shape, chunks=array.chunks, dtype=array.dtype,
                               fill_value=array.fill_value)
        group.attrs.update(attrs)
        _publish(building, path)
        return cls.open(path, mode="a")

    @classmethod
    def open(cls, path: Location | str, mode: str = "r") -> TeacherStore:
        """Open a finished store (folder or URL); anything else at `path` raises a StoreError that says what it is."""
        path = store_location(path)
        if not (path / "zarr.json").exists():
            try:
                inside = [store.name for store in stores_under(path)]
            except LocationError:  # a folder over https:// cannot be listed
                inside = []
            if inside:  # a cache root given where a store was meant
                raise FolderOfStores(f"{path}: a folder of stores ({len(inside)} *.zarr), not a store: name one (e.g. "
                                     f"{path / inside[0]}), or list them with `dho cache list --root "
                                     f"{shlex.quote(str(path))}`")
            raise FileNotFoundError(f"{path}: no teacher store here (run `dho cache-teacher` first)")
        try:
            group = _zarr_group(path, mode=mode)
            found = group.attrs.get("format")
        except Exception as e:
            raise StoreError(f"{path}: unreadable store metadata ({one_line(e)})") from None
        if found is None:
            raise StoreError(f"{path}: a zarr group without dho's attributes (an interrupted creation, which "
                             "`dho cache-teacher` replaces, or not a teacher store)")
        if found not in (STORE_FORMAT, TOPK_STORE_FORMAT):
            raise StoreError(f"{path}: not a teacher store this dho reads (format {found!r}, expected "
                             f"{STORE_FORMAT!r} or {TOPK_STORE_FORMAT!r}); rerun `dho cache-teacher --overwrite` "
                             "to rebuild it")
        store = cls(path, group)
        missing = [name for name in (*store.arrays, "checksums") if name not in group]
        if missing:
            raise StoreError(f"{path}: array {missing[0]!r} is missing; rerun `dho cache-teacher --overwrite`")
        return store

    @classmethod
    def open_or_create(cls, path: Location, fingerprint: dict, manifest: Manifest, num_views: int,
                       overwrite: bool = False, with_zero_shot: bool = False,
                       request: str | None = None, top_k: int | None = None) -> TeacherStore:
        """Reuse a store made from the same fingerprint, refuse another one unless `overwrite`.

        An interrupted creation (metadata without attributes or data) is replaced; with `overwrite`,
        anything at `path` is. Call with the store's write lock held.
        """
        path = store_location(path)
        if path.exists() or path.is_symlink():
            try:
                store = cls.open(path, mode="a")
            except FolderOfStores:
                raise  # --overwrite would remove every store in it
            except (StoreError, FileNotFoundError) as e:
                if not (overwrite or interrupted_creation(path)):
                    what = str(e) if isinstance(e, StoreError) else f"{path}: exists and is not a teacher store"
                    raise StoreError(f"{what}; pass --overwrite to replace it, or choose another cache.store") from None
            else:
                if store.fingerprint == fingerprint:
                    return store
                if not overwrite:
                    store.check_fingerprint(fingerprint)
            _remove(path)
        return cls.create(path, fingerprint, manifest, num_views, with_zero_shot, request, top_k)

    def check_fingerprint(self, expected: dict) -> None:
        """Raise StoreMismatch naming every field where this store differs from `expected`, with both values."""
        fields = described_diff(self.fingerprint, expected)
        if fields:
            raise StoreMismatch.of(self.path, fields, "Use another cache.store, or rerun `dho cache-teacher "
                                                      "--overwrite` to replace it.")

    def shards(self) -> list[StoreShard]:
        """Every shard of the store's fingerprint, in row order, with its split."""
        split_of = {first: split for split, ranges in self.attrs["splits"].items() for first, _ in ranges}
        return [StoreShard(split_of[first], name, first, count)
                for name, first, count, _ in self.fingerprint["shards"]]

    def shard_done(self, shard: Shard | StoreShard) -> bool:
        """Whether the shard is marked done (an unreadable mark counts as not done: it gets recomputed)."""
        try:
            return bool(self.array("done")[_rows(shard)].all())
        except Exception:
            return False

    def shard_flags(self, shard: Shard | StoreShard) -> tuple[bool, np.ndarray]:
        """(all rows done, bad-image mask) of a shard: a cheap read (its full check comes with read_shard)."""
        try:
            return bool(self.array("done")[_rows(shard)].all()), self.array("bad")[_rows(shard)]
        except Exception as e:
            raise StoreError(f"{self.path}: shard {shard.name}: done/bad marks unreadable ({one_line(e)}); "
                             "rerun `dho cache-teacher` with its config to recompute it") from None

    def unmark(self, shard: Shard | StoreShard) -> None:
        """Mark a shard not done, so stage one recomputes it."""
        self._write_chunk("done", shard, np.zeros(shard.count, bool))

    def _write_chunk(self, name: str, shard: Shard | StoreShard, values: np.ndarray) -> None:
        """Write the shard's rows as its whole chunk (rows past the shard get the fill value): the old chunk
        is never read, so a damaged one is simply replaced."""
        array = self.array(name)
        chunk = array.chunks[0]
        start = self._chunk(shard) * chunk
        whole = np.full((min(chunk, array.shape[0] - start), *array.shape[1:]), array.fill_value, array.dtype)
        whole[shard.first_row - start: shard.first_row - start + shard.count] = values
        array[start: start + len(whole)] = whole

    def write_shard(self, shard: Shard, **values: np.ndarray) -> None:
        """Write one shard's rows of every checked array (one chunk each), their checksums, then the done mark:
        a crash before it redoes it."""
        if set(values) != set(self.checked):
            raise ValueError(f"write_shard: got arrays {sorted(values)}, this store holds {sorted(self.checked)}")
        sums = []
        try:
            for name in self.checked:
                stored = np.asarray(values[name]).astype(self.array(name).dtype, copy=False)
                self._write_chunk(name, shard, stored)
                sums.append(digest(stored))
            self.array("checksums")[self._chunk(shard)] = np.array(sums, np.uint32)
            self._write_chunk("done", shard, np.ones(shard.count, bool))
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path, sum(np.asarray(v).nbytes for v in values.values())) from e
            raise

    def verify_shard(self, shard: Shard | StoreShard) -> str | None:
        """None when the shard is done and intact, else what is wrong with it, in a few words."""
        return self._read_checked(shard)[1]

    def read_shard(self, shard: Shard | StoreShard) -> ShardRows:
        """The shard's rows, checked against their checksums; raises StoreError naming array and shard."""
        arrays = self._verified(shard)
        return ShardRows(**{name: arrays[name] for name in self.arrays})

    def read_checked_arrays(self, shard: Shard | StoreShard) -> dict[str, np.ndarray]:
        """Every checked array's rows of the shard (what write_shard takes), verified; raises StoreError."""
        arrays = self._verified(shard)
        return {name: arrays[name] for name in self.checked}

    def _verified(self, shard: Shard | StoreShard) -> dict[str, np.ndarray]:
        arrays, problem = self._read_checked(shard)
        if problem:
            raise self._unusable(shard, problem)
        return arrays

    def require_intact(self, shards: list[Shard]) -> None:
        """Verify `shards` up front; raise StoreError naming the first that is damaged or not computed yet."""
        problems = {s: p for s, p in self.check_shards(shards).items() if p}
        if problems:
            shard, problem = next(iter(problems.items()))
            more = f" ({len(problems) - 1} more shards too)" if len(problems) > 1 else ""
            raise self._unusable(shard, problem + more)

    def _unusable(self, shard: Shard | StoreShard, problem: str) -> StoreError:
        if problem.startswith(NOT_DONE):
            return StoreError(f"{self.path}: shard {shard.name} is not cached yet; finish `dho cache-teacher` first")
        return StoreError(f"{self.path}: shard {shard.name} (rows {shard.first_row}-{shard.first_row + shard.count - 1}"
                          f"): {problem}; rerun `dho cache-teacher` with its config to recompute it (or `dho cache "
                          "verify STORE --repair -c CONFIG`)")

    def _read_checked(self, shard: Shard | StoreShard) -> tuple[dict[str, np.ndarray], str | None]:
        """(arrays read, problem): every array's rows of the shard, and why they cannot be trusted, if so."""
        rows, arrays = _rows(shard), {}
        for name in ("done", *self.checked, "checksums"):
            at = self._chunk(shard) if name == "checksums" else rows
            try:
                arrays[name] = self.array(name)[at]
            except Exception as e:
                return arrays, f"array {name!r}: chunk unreadable ({one_line(e)})"
            if name == "done" and not arrays["done"].all():
                return arrays, NOT_DONE
        if not arrays["checksums"].any():
            return arrays, "array 'checksums': chunk missing"
        for name, expected in zip(self.checked, arrays["checksums"], strict=True):
            if digest(arrays[name]) != int(expected):
                return arrays, f"array {name!r}: does not match its checksum (chunk missing, truncated or overwritten)"
        return arrays, None

    def check_shards(self, shards: list[Shard] | list[StoreShard] | None = None,
                     progress: bool = False) -> dict[StoreShard, str | None]:
        """verify_shard of every shard (all of the store's by default), read by a few threads at once.

        This reads each chunk once: at 2 bytes per logit, far less than one epoch's images.
        """
        shards = self.shards() if shards is None else shards
        with thread_pool(VERIFY_THREADS) as pool:
            checks = tqdm(pool.map(self.verify_shard, shards), total=len(shards), desc=f"verify {self.path.name}",
                          unit="shard", disable=not progress, leave=False)
            return dict(zip(shards, checks, strict=True))

    def bad_rows(self, shards: list[Shard] | list[StoreShard]) -> frozenset[int]:
        """The rows of `shards` marked bad (undecodable when the store was made): readers leave them out."""
        return frozenset(int(row) for s in shards for row in np.flatnonzero(self.shard_flags(s)[1]) + s.first_row)

    def bad_images(self) -> int:
        """Images the store marks bad (undecodable, skipped): one read of its `bad` array."""
        return int(self.array("bad")[:].sum())

    def missing_chunk_files(self, done: list[StoreShard] | None = None) -> dict[StoreShard, str]:
        """Of the shards marked done (`done`, if known), those with a chunk file missing, from one listing of
        the store's files (no chunk read).

        Zarr leaves out a chunk that is all fill value, so only chunks that cannot be are expected: labels,
        checksums always; the logit arrays, boxes and zero_shot unless the shard has bad images (a
        `bad` chunk), whose rows hold fill values. A cheap check for `cache list`; `cache verify` reads them all.
        """
        files = {_relative(f, self.path) for f in _files(self.path)}
        missing = {}
        for shard in [s for s in self.shards() if self.shard_done(s)] if done is None else done:
            key = self._chunk(shard)
            expected = ["labels", "checksums"]
            if self._chunk_file("bad", key) not in files:
                expected += [name for name in self.checked if name not in ("labels", "bad", "flips")]
            lost = next((name for name in expected if self._chunk_file(name, key) not in files), None)
            if lost:
                missing[shard] = f"array {lost!r}: chunk file {self._chunk_file(lost, key)} missing"
        return missing

    def _chunk_file(self, name: str, chunk: int) -> str:
        """The path, relative to the store, of chunk `chunk` (along rows) of array `name`."""
        array = self.array(name)
        return f"{name}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"

    def _chunk(self, shard: Shard | StoreShard) -> int:
        return shard.first_row // self.array("boxes").chunks[0]

    def split_rows(self) -> dict[str, np.ndarray]:
        """The row ids of every split, from the store's own attributes."""
        return {
            split: np.concatenate([np.arange(a, a + n) for a, n in ranges] or [np.zeros(0, int)])
            for split, ranges in self.attrs["splits"].items()
        }

    def bytes_on_disk(self) -> int:
        if isinstance(self.path, UrlPath):
            return self.path.total_bytes()
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


NOT_DONE = "not computed yet"


def _rows(shard: Shard | StoreShard) -> slice:
    return slice(shard.first_row, shard.first_row + shard.count)


@contextlib.contextmanager
def thread_pool(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of `threads` that, left on an error or Ctrl-C, finishes the tasks running and starts no other
    (`with ThreadPoolExecutor(...)` would first run every task submitted: a whole copy or verify)."""
    pool = ThreadPoolExecutor(threads)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stores_under(root: Location) -> list[Location]:
    """The *.zarr folders under a cache root, by name; an https:// root cannot be listed: name the store."""
    if isinstance(root, UrlPath) and not root.writable:
        raise LocationError(f"cache.root: {root} cannot be listed over {root.protocol}://; "
                            "set cache.store to the store's URL")
    return sorted(root.glob("*.zarr"), key=str)


def store_location(path: Location | str) -> Location:
    """The store's location; a cache prefix is refused (stores are read straight, one object per shard and array)."""
    path = location(path)
    if isinstance(path, UrlPath) and path.cache:
        raise LocationError(f"{path}: a store is read straight from its URL (one object per shard and array); "
                            f"drop the '{path.cache}::' prefix")
    return path


def _zarr_group(path: Location, mode: str) -> zarr.Group:
    if isinstance(path, UrlPath):
        return zarr.open_group(path.url, mode=mode, storage_options=STORAGE_OPTIONS)
    return zarr.open_group(str(path), mode=mode)


def interrupted_creation(path: Location) -> bool:
    """Metadata files only, and no group zarr.json with dho's attributes: a creation or publish cut short
    (on an object store, some arrays' zarr.json may have been copied before the group's). Nothing to lose."""
    files = _files(path)
    if not files or any(f.name != "zarr.json" for f in files):
        return False
    if not (path / "zarr.json").is_file():
        return True
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except ValueError:
        return False
    return "format" not in attrs


def _relative(file: Location, folder: Location) -> str:
    """`file`'s path under `folder`; for URLs from the filesystem paths, since a listed file's URL may spell the
    scheme otherwise (s3a:// lists as s3://, gcs:// as gs://)."""
    if isinstance(file, UrlPath):
        return posixpath.relpath(file.path, folder.path)
    return file.relative_to(folder).as_posix()


def _files(path: Location) -> list[Location]:
    return path.files() if isinstance(path, UrlPath) else [f for f in path.rglob("*") if f.is_file()]


def _remove(path: Location) -> None:
    if isinstance(path, UrlPath):
        path.remove()
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _publish(building: Location, path: Location) -> None:
    """Move a just-created store (metadata files only) to `path` so that it appears whole or not at all.

    Locally, one rename. An object store has no rename: the metadata objects are copied, the group's
    zarr.json (whose attributes make it a teacher store) last, then the building copy is removed.
    """
    if not isinstance(building, UrlPath):
        # on the disk before the rename: a power cut leaves no store of empty metadata files
        for item in [*building.rglob("*"), building]:
            flush_to_disk(item)
        os.rename(building, path)
        flush_to_disk(path.parent)
        return
    group_json = building / "zarr.json"
    files = sorted(_files(building), key=lambda f: f == group_json)
    for f in files:
        building.fs.copy(f.path, path.path + f.url[len(building.url):])
    _remove(building)


def build_fingerprint(teacher: dict, views: dict, manifest: Manifest, top_k: int | None = None) -> dict:
    """Everything the cached logits depend on: teacher, class names, view recipe, the shards and, for a top-k
    store, k (a dense store's fingerprint has no top_k field, as before top-k stores existed)."""
    fingerprint = {
        "format": TOPK_STORE_FORMAT if top_k else STORE_FORMAT,
        "teacher": teacher,
        "class_names": list(manifest.class_names),
        "views": views,
        "shards": manifest.fingerprint(),
    }
    if top_k:
        fingerprint["top_k"] = top_k
    return json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
