"""Where shards and stores live: a local path, or any fsspec URL (s3://, gs://, https://, ...).

`location(value)` gives a pathlib.Path for a local path (every local code path stays as it was) and a
`UrlPath` for a URL. UrlPath offers the part of Path's interface that shards and stores use (name, parent,
`/`, exists, is_file, stat().st_size, read/write bytes and text, glob), through the URL's fsspec filesystem.
Credentials come from the environment as fsspec and the backend read them (AWS_* variables, ~/.aws,
fsspec's own config), never from pipeline.yaml. A backend that is not installed is a one-line error that
names the extra bringing it.

Shards may be read through fsspec's local caches (`simplecache::s3://bucket/shards`, `filecache::...`): a
shard is then fetched once per loader worker (simplecache, into a temporary folder of the main process,
removed when it exits) or once per machine (filecache with a cache_storage in fsspec's config), and its
sha256 is still checked on every read.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import fsspec

from dho_pipeline.errors import DhoError
from dho_pipeline.extras import MissingExtra

# URL scheme -> the extra (pyproject.toml) that brings its fsspec backend
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


class LocationError(DhoError, ValueError):
    """A URL that cannot serve what is asked of it (an unknown scheme, a write to https://, a listing of it)."""


def is_url(value: str | Path) -> bool:
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


def location(value: str | Path | UrlPath) -> Path | UrlPath:
    """A Path for a local path (file:// URLs included), a UrlPath for any other URL."""
    if isinstance(value, (Path, UrlPath)):
        return value
    if value.startswith("file://"):
        return Path(value.removeprefix("file://"))
    return UrlPath(value) if is_url(value) else Path(value)


# Listings are not cached: zarr writes through its own filesystem instance, and other machines write too.
STORAGE_OPTIONS = {"use_listings_cache": False}


MAIN_PID = os.getpid()  # forked loader workers inherit it, and with it the main process's simplecache folder


@functools.cache
def _simplecache_root() -> Path:
    """One folder per main process, removed when that process exits (with its workers' subfolders).

    fsspec's own temporary folder would be left behind by every loader worker (they exit without running
    atexit), each holding a copy of its shards.
    """
    folder = Path(tempfile.gettempdir()) / f"dho-simplecache-{MAIN_PID}"
    if os.getpid() == MAIN_PID:
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _simplecache_folder() -> Path:
    """Where simplecache:: keeps this process's copies: a subfolder of its own under the main process's folder.

    fsspec downloads a file into its cache path in place, so two loader workers sharing one folder (a split
    with fewer shards than workers is read by all of them) would read each other's partial downloads.
    """
    return _simplecache_root() / str(os.getpid())


def drop_simplecache_copies(pids: Iterable[int]) -> None:
    """Remove the simplecache:: copies of ended processes (loader workers), which no later worker reads."""
    for pid in pids:
        shutil.rmtree(_simplecache_root() / str(pid), ignore_errors=True)


_INHERITED: list[fsspec.AbstractFileSystem] = []  # in a forked child: the parent's instances, never used


def _cached_instances() -> list[fsspec.AbstractFileSystem]:
    """Every instance in fsspec's per-class instance caches (zarr's asynchronous ones included)."""
    classes, instances = [fsspec.AbstractFileSystem], []
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        instances.extend(cls.__dict__.get("_cache", {}).values())
    return instances


def _hold_inherited() -> None:
    _INHERITED[:] = _cached_instances()


def _release_inherited() -> None:
    _INHERITED.clear()


# A forked loader worker gets copies of the parent's filesystem instances, with their aiohttp sessions on the
# parent's event loops and sockets. fsspec drops them from its cache in the child and builds the child its own;
# collected there, s3fs would close the parent's client from the child, and an asynchronous instance's
# session (zarr's) logs "Unclosed client session". The child keeps them, unused, until it ends with
# os._exit, which collects nothing; the parent keeps nothing beyond the fork.
if hasattr(os, "register_at_fork"):  # POSIX; spawned children inherit nothing
    os.register_at_fork(before=_hold_inherited, after_in_parent=_release_inherited)


def _filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """fsspec's instance for the scheme (fsspec caches it per process: async ones are not fork-safe)."""
    try:
        return fsspec.filesystem(protocol, **STORAGE_OPTIONS)
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        hint = f"pip install -e '.[{extra}]' in the dho repository" if extra else f"install fsspec's {protocol} backend"
        raise MissingExtra(f"{protocol}:// needs a package that is not installed ({e}); {hint}") from None
    except ValueError as e:
        raise LocationError(f"{protocol}://: not a storage scheme fsspec knows ({e})") from None


class UrlPath:
    """A file or folder named by a URL, with the subset of pathlib.Path that dho uses."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.cache, _, target = self.url.rpartition("::")  # "simplecache::s3://...": read through a local copy
        self.protocol = target.split("://", 1)[0]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        target = _filesystem(self.protocol)  # a missing backend is named, also behind a cache
        return self._chained()[0] if self.cache else target

    @property
    def path(self) -> str:
        """The URL as the filesystem's own methods take it (without the scheme for object stores)."""
        return self._chained()[1] if self.cache else self.fs._strip_protocol(self.url)

    def _chained(self) -> tuple[fsspec.AbstractFileSystem, str]:
        options = {self.protocol: STORAGE_OPTIONS}
        if self.cache == "simplecache":
            options["simplecache"] = {"cache_storage": str(_simplecache_folder())}
        return fsspec.core.url_to_fs(self.url, **options)

    @property
    def writable(self) -> bool:
        return self.protocol not in ("http", "https")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> UrlPath:
        return UrlPath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> UrlPath:
        return UrlPath(self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> UrlPath:
        return self.parent / name

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=self.fs.size(self.path))

    def open(self, mode: str = "rb"):
        return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        """Delete the file; FileNotFoundError if there is none, unless `missing_ok`."""
        if not missing_ok and not self.exists():
            raise FileNotFoundError(str(self))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores have no folders (and a mistyped bucket must not be created)."""

    def glob(self, pattern: str) -> list[UrlPath]:
        return self._urls(self.fs.glob(f"{self.path}/{pattern}"))

    def expand(self) -> list[UrlPath]:
        """The files this URL's glob pattern (*, ?, [..]) matches."""
        return self._urls(self.fs.glob(self.path))

    def files(self) -> list[UrlPath]:
        """Every file below this folder."""
        return self._urls(self.fs.find(self.path))

    def _urls(self, paths: list[str]) -> list[UrlPath]:
        """The filesystem's paths as URLs, sorted."""
        return [UrlPath(self.fs.unstrip_protocol(p)) for p in sorted(paths)]

    def total_bytes(self) -> int:
        return int(self.fs.du(self.path, total=True))

    def remove(self) -> None:
        """Delete the file, or the folder with everything below it."""
        self.fs.rm(self.path, recursive=True)


Location = Path | UrlPath
