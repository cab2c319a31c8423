"""Write and read the WebDataset shards: seeded labelled / unlabelled / val / test splits and their manifest."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import shlex
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_iterator

from dho_pipeline.atomic_write import flush_to_disk, write_whole
from dho_pipeline.data.sources import BadImage, FileSource, IdxSource, Item
from dho_pipeline.errors import DhoError, one_line
from dho_pipeline.locations import Location, LocationError, UrlPath, location

SPLITS = ("labelled", "unlabelled", "val", "test")
# A fixed member mtime makes shards byte-reproducible (same splits, same sha256) and keeps tar's PAX headers
# out of them (webdataset's default float mtime adds one per member, half the parse time of a small sample).
MEMBER_MTIME = 0
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dho-shards/1"
SOURCES = "sources.json"  # beside the manifest, from file sources: each sample's source file, by shard
SOURCES_FORMAT = "dho-shard-sources/1"
PROGRESS = "make-shards-progress.json"  # beside the shards until the manifest is written: the finished ones
PROGRESS_FORMAT = "dho-make-shards-progress/1"
MAX_NAMED = 5  # bad source files named in make-shards' error (then a count)


class ShardDataError(DhoError, ValueError):
    """A shard is missing, damaged or malformed; the message names the shard file (and the sample)."""


@dataclass(frozen=True)
class Shard:
    """One tar file of a split and the global rows it holds: [first_row, first_row + count).

    `sha256` and `size` (bytes) are what make-shards wrote; empty / None for shard sets without a manifest.
    `num_classes`: every sample's class index is below it (the manifest's classes), where known.
    """

    split: str
    path: Location
    first_row: int
    count: int
    sha256: str
    size: int | None = None
    num_classes: int | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rows(self) -> range:
        return range(self.first_row, self.first_row + self.count)


@dataclass
class Manifest:
    """What `make-shards` wrote: class names, shard size and the shards of every split."""

    root: Location
    class_names: list[str]
    shard_size: int
    splits: dict[str, list[Shard]]
    info: dict

    @property
    def num_rows(self) -> int:
        """Size of the row space (splits start at shard-size multiples, so it may exceed the sample count)."""
        return max((s.first_row + s.count for shards in self.splits.values() for s in shards), default=0)

    def split_count(self, split: str) -> int:
        return sum(s.count for s in self.splits.get(split, []))

    def split_rows(self, split: str) -> np.ndarray:
        return np.concatenate([np.arange(s.first_row, s.first_row + s.count) for s in self.splits[split]] or [[]])

    def shards(self, splits: tuple[str, ...] = SPLITS) -> list[Shard]:
        return [s for split in splits for s in self.splits.get(split, [])]

    def fingerprint(self) -> list[list]:
        """What the cached logits depend on from the data: every shard's name, size and hash."""
        return [[s.path.name, s.first_row, s.count, s.sha256] for s in self.shards()]

    def fingerprint_hash(self) -> str:
        """A short hash of the fingerprint: the same data wherever the shards are (checkpoints keep it)."""
        return hashlib.sha256(json.dumps(self.fingerprint()).encode()).hexdigest()[:16]

    def check_files(self, shards: list[Shard]) -> None:
        """Cheap up-front check that `shards` are on disk at the size make-shards wrote (full hash: on read)."""
        for shard in shards:
            if not shard.path.is_file():
                raise ShardDataError(f"{shard.path}: missing, but {self.root / MANIFEST} lists it; "
                                     "restore the shard folder as make-shards wrote it")
            size = shard.path.stat().st_size
            if shard.size is not None and size != shard.size:
                raise ShardDataError(f"{shard.path}: {size} bytes, {self.root / MANIFEST} says {shard.size}; "
                                     "the file was truncated or replaced after make-shards")


def sample_key(row: int) -> str:
    """The `__key__` make-shards gives the sample of global row `row`."""
    return f"{row:09d}"


def sha256_file(path: Location, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_shards(
    source: IdxSource | FileSource,
    splits: dict[str, list[Item]],
    out: Location,
    *,
    shard_size: int = 1000,
    info: dict | None = None,
) -> Manifest:
    """Write each split as tar shards of `shard_size` samples and a manifest.json beside them.

    Every split starts at a row that is a multiple of `shard_size`, so a shard is exactly one chunk
    of the teacher-logit store. Each sample holds the image bytes as found, `cls` and its global row `id`.
    The same splits always give the same bytes. `out` may be a URL: each shard is written to a local
    temporary folder, uploaded as soon as it is complete and deleted, and the manifest comes last (a folder
    without one is not a shard set), so the local disk holds one shard at a time.

    Resumable: `make-shards-progress.json` beside the shards lists those finished so far, and a call with the
    same splits (and `info`) after a kill, Ctrl-C or error writes only the rest. Files that are no image
    (FileSource.read) are all collected, then refused in one BadImage naming them, and every shard is removed.
    From files, `sources.json` beside the manifest names each sample's source file, so a later decode error
    can name it.
    """
    out = location(out)
    remote = isinstance(out, UrlPath)
    if remote and not out.writable:
        raise LocationError(f"{out}: {out.protocol}:// is read-only; write shards to a local folder or an object "
                            "store")
    plan = _plan_digest(source, splits, shard_size, info)
    if (out / MANIFEST).exists():
        if _finished_before(out, plan) is not None:  # stopped between writing the manifest and the end
            (out / PROGRESS).unlink()
            return load_manifest(out)
        raise FileExistsError(f"{out / MANIFEST} exists: shards are immutable once a store refers to them; "
                              "write to a new directory")
    written = _finished_before(out, plan) or {}  # file name -> (sha256, bytes)

    def finished(file: str) -> None:
        local = Path(file)
        sha, size = sha256_file(local), local.stat().st_size
        if remote:
            out.fs.put_file(str(local), (out / local.name).path)
            local.unlink()
        else:
            flush_to_disk(local)  # before the progress file lists it: a power cut never leaves a listed shard short
        written[local.name] = (sha, size)
        progress = {"format": PROGRESS_FORMAT, "plan": plan, "info": info, "shards": written}
        write_whole(out / PROGRESS, json.dumps(progress, indent=1).encode())

    created = not out.exists()
    names = {split: [f"{split}-{k:05d}.tar" for k in range(math.ceil(len(items) / shard_size))]
             for split, items in splits.items()}
    try:
        shards = _write_splits(source, splits, names, out, shard_size, finished, written)
    except BadImage:  # nothing of a source with unreadable files is kept
        _remove_shards(out, [name for split in names.values() for name in split] + [PROGRESS], created)
        raise
    manifest = Manifest(out, list(source.class_names), shard_size, shards, dict(info or {}))
    counts = {k: np.bincount([it.label for it in v], minlength=len(manifest.class_names)).tolist()
              for k, v in splits.items()}
    manifest.info["class_counts"] = counts
    if isinstance(source, FileSource):
        files = {name: [str(Path(item.ref).absolute()) for item in splits[split][k * shard_size: (k + 1) * shard_size]]
                 for split, split_names in names.items() for k, name in enumerate(split_names)}
        (out / SOURCES).write_text(json.dumps({"format": SOURCES_FORMAT, "shards": files}))
    save_manifest(manifest)
    (out / PROGRESS).unlink(missing_ok=True)  # none when every split is empty
    return manifest


def _plan_digest(source: IdxSource | FileSource, splits: dict[str, list[Item]], shard_size: int,
                 info: dict | None) -> str:
    """A digest of what fixes every shard's bytes: the classes, the shard size, each split's images in order
    and the call's `info` (make-shards' arguments, the source folder among them)."""
    h = hashlib.sha256(json.dumps([list(source.class_names), shard_size, info], sort_keys=True, default=str).encode())
    for split in SPLITS:
        for item in splits.get(split, []):
            h.update(f"{split}\t{item.ref}\t{item.label}\n".encode())
    return h.hexdigest()


def _finished_before(out: Location, plan: str) -> dict[str, tuple[str, int]] | None:
    """The shards a stopped call with the same plan finished in `out` (each still there at its size); None
    without a progress file. Refuses the progress of another plan, whose shards this call would overwrite."""
    try:
        progress = json.loads((out / PROGRESS).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        progress = {}
    if progress.get("format") != PROGRESS_FORMAT or progress.get("plan") != plan:
        raise FileExistsError(f"{out / PROGRESS}: {out} holds the shards of a stopped make-shards with other "
                              "arguments or another source (its arguments are under 'info' in that file, unless "
                              "it is damaged): rerun that command to finish it, or write to a new directory")
    return {name: (sha, size) for name, (sha, size) in progress["shards"].items()
            if (out / name).exists() and (out / name).stat().st_size == size}


def _write_splits(source: IdxSource | FileSource, splits: dict[str, list[Item]], names: dict[str, list[str]],
                  out: Location, shard_size: int, finished: Callable[[str], None],
                  written: dict[str, tuple[str, int]]) -> dict[str, list[Shard]]:
    """The tar files of every split (see write_shards); raises BadImage naming every file that is no image."""
    remote = isinstance(out, UrlPath)
    next_row = 0
    shards: dict[str, list[Shard]] = {}
    bad: list[str] = []
    total = sum(len(v) for v in splits.values())
    with (tempfile.TemporaryDirectory(prefix="dho-shards-") if remote else contextlib.nullcontext(out)) as staging, \
            tqdm(total=total, desc="make-shards", unit="img") as bar:
        Path(staging).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            items = splits.get(split, [])
            first = next_row
            if not items:  # no empty tar file for a split without samples (a test-only set has three)
                shards[split] = []
                continue
            done = next((k for k, name in enumerate(names[split]) if name not in written), len(names[split]))
            bar.update(min(done * shard_size, len(items)))  # finished by a stopped call with the same splits
            if done < len(names[split]):
                _write_tars(source, items, first, done, str(Path(staging) / f"{split}-%05d.tar"), shard_size,
                            finished, bad, bar)
            if not bad:
                shards[split] = [Shard(split, out / name, first + k * shard_size,
                                       min(shard_size, len(items) - k * shard_size), *written[name],
                                       len(source.class_names)) for k, name in enumerate(names[split])]
            next_row = first + len(names[split]) * shard_size
    if bad:
        more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise BadImage(f"{len(bad)} source file{'s' if len(bad) > 1 else ''} PIL cannot read, nothing written: "
                       f"{'; '.join(sorted(bad)[:MAX_NAMED])}{more}; remove or replace them and rerun")
    return shards


def _write_tars(source: IdxSource | FileSource, items: list[Item], first: int, start: int, pattern: str,
                shard_size: int, finished: Callable[[str], None], bad: list[str], bar: tqdm) -> None:
    """Shards `start`, `start` + 1, ... of one split (its first row is `first`); each goes to `finished` once
    whole, never one cut short by an exception. A file that is no image goes to `bad`."""
    stopped = False

    def whole(file: str) -> None:
        if not stopped and not bad:  # nor one cut short by a file that is no image: nothing of those is kept
            finished(file)

    # maxsize: a shard is shard_size samples whatever their bytes (webdataset starts a new file at 3 GB)
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, mtime=MEMBER_MTIME,
                         post=whole, start_shard=start) as sink:
        try:
            for i in range(start * shard_size, len(items)):
                bar.update()
                try:
                    data, ext = source.read(items[i].ref)
                except BadImage as e:
                    bad.append(str(e))
                    continue
                if not bad:  # after the first bad file, only check the rest
                    row = first + i
                    sink.write({"__key__": sample_key(row), ext: data, "cls": items[i].label, "id": row})
        except BaseException:
            stopped = True  # the writer's exit still closes the shard in hand and hands it to `post`
            raise


def _remove_shards(out: Location, names: list[str], created: bool) -> None:
    """Remove the tar files a failed write_shards may have left (and `out` itself when it made it and it is empty)."""
    for name in names:
        with contextlib.suppress(OSError):
            (out / name).unlink(missing_ok=True)
    if created and not isinstance(out, UrlPath):
        with contextlib.suppress(OSError):
            out.rmdir()


def upload_shards(manifest: Manifest, out: UrlPath) -> Manifest:
    """Copy a local shard set to `out`, shard by shard (with sources.json, where make-shards wrote one), the
    manifest last; returns the manifest at `out`."""
    shards = manifest.shards()
    for shard in tqdm(shards, desc=f"upload to {out}", unit="shard", leave=False):
        out.fs.put_file(str(shard.path), (out / shard.name).path)
    if (manifest.root / SOURCES).exists():
        out.fs.put_file(str(manifest.root / SOURCES), (out / SOURCES).path)
    out.fs.put_file(str(manifest.root / MANIFEST), (out / MANIFEST).path)
    return load_manifest(out)


def save_manifest(manifest: Manifest) -> None:
    doc = {
        "format": MANIFEST_FORMAT,
        "class_names": manifest.class_names,
        "shard_size": manifest.shard_size,
        "info": manifest.info,
        "splits": {
            split: {
                "count": manifest.split_count(split),
                "shards": [{"file": s.path.name, "first_row": s.first_row, "count": s.count, "sha256": s.sha256,
                            "bytes": s.size} for s in shards],
            }
            for split, shards in manifest.splits.items()
        },
    }
    write_whole(manifest.root / MANIFEST, json.dumps(doc, indent=1).encode())  # a kill never leaves it cut off


def load_manifest(root: Location | str) -> Manifest:
    """Read `root/manifest.json` (a folder or a URL); a missing or foreign file gets an error that says what to run."""
    root = location(root)
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: make shards first with `dho make-shards SOURCE "
                                f"{shlex.quote(str(root))}`")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:  # cut off or edited by hand: JSONDecodeError, or bytes that are no UTF-8
        raise ShardDataError(f"{path}: not a readable manifest ({one_line(e)}); rerun make-shards into a new "
                             "directory") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ShardDataError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}: not a manifest this dho "
                             "writes")
    try:
        splits = {
            split: [Shard(split, root / s["file"], s["first_row"], s["count"], s["sha256"], s.get("bytes"),
                          len(doc["class_names"])) for s in entry["shards"]]
            for split, entry in doc["splits"].items()
        }
        return Manifest(root, doc["class_names"], doc["shard_size"], splits, doc.get("info", {}))
    except (KeyError, TypeError, AttributeError) as e:
        problem = f"lacks the field {e}" if isinstance(e, KeyError) else f"has a field of another type ({one_line(e)})"
        raise ShardDataError(f"{path}: the manifest {problem}; rerun make-shards into a new directory") from None


def read_shard_bytes(shard: Shard) -> bytes:
    """The whole tar file of `shard`, checked against the sha256 make-shards recorded (when there is one)."""
    try:
        data = shard.path.read_bytes()
    except FileNotFoundError:
        raise ShardDataError(f"{shard.path}: missing (a shard of split {shard.split!r})") from None
    if shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardDataError(f"{shard.path}: contents differ from the sha256 in {MANIFEST} (the file was "
                             "truncated, rewritten or replaced after make-shards); restore it or rerun make-shards")
    return data


@functools.lru_cache(maxsize=4)
def _source_files(folder: str) -> dict[str, list[str]]:
    path = location(folder) / SOURCES
    try:
        return json.loads(path.read_text())["shards"] if path.exists() else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def source_file(shard: Shard, position: int) -> str | None:
    """The file make-shards read sample `position` of `shard` from, when its sources.json says (only shards
    written from files since it exists have one); None otherwise. For error messages: read on demand."""
    files = _source_files(str(shard.path.parent)).get(shard.name, [])
    return files[position] if 0 <= position < len(files) else None


def iter_shard(shard: Shard) -> Iterator[dict]:
    """The raw samples of one shard, in order (bytes per extension, plus __key__ and __url__).

    The file is read whole and hashed first (cheap next to decoding its images), so a changed shard
    stops the run before any of its samples is used.
    """
    data = read_shard_bytes(shard)
    url = str(shard.path)
    try:
        files = [dict(f, __url__=url) for f in tar_file_iterator(io.BytesIO(data))]
    except (tarfile.TarError, OSError) as e:
        raise ShardDataError(f"{shard.path}: not a readable tar file ({e})") from None
    yield from group_by_keys(files)
