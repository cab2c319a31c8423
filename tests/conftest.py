"""Shared fixtures: a small real slice of Fashion-MNIST as shards, a tiny open_clip teacher file and its
finished store; helpers to check one-line CLI errors and to fill a disk; a check that no test leaves a
worker process running."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import math
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from click.testing import Result

from dho_pipeline.config import load_config
from dho_pipeline.data.shards import write_shards
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource
from dho_pipeline.data.splits import split_source
from dho_pipeline.teacher.open_clip_teacher import register_model_configs

SHARD_SIZE = 32
WORKER_EXIT_S = 10  # how long a test's worker processes may take to exit after it


def available_cores(cgroup: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (`docker --cpus`, CI
    runners), which neither the affinity nor pytest-xdist's own count sees."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup, membership)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(cgroup: Path, membership: Path) -> float | None:
    """The CPUs a cgroup quota allows this process: cgroup v2's cpu.max of its own cgroup (named in
    `membership`) or the root, else v1's cpu.cfs_quota_us; None without one."""
    try:
        own = next((line[3:].strip("/ ") for line in membership.read_text().splitlines() if line.startswith("0::")), "")
    except OSError:
        own = ""
    for folder in dict.fromkeys([cgroup / own, cgroup]):
        try:
            quota, period = (folder / "cpu.max").read_text().split()
            break
        except (OSError, ValueError):
            continue
    else:
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    return None if quota in ("max", "-1") else int(quota) / int(period)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core this process may use (see available_cores)."""
    return available_cores()


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist workers share the cores: an equal part each, for torch here and for the commands tests start
    # (OpenMP threads beyond the cores spin-wait against each other: tens of times slower)
    threads = max(1, available_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test() -> Iterator[None]:
    """Fail the test that leaves a loader worker running, and kill the worker.

    multiprocessing's exit handler terminates and then joins every child, so one that ignores SIGTERM (stage
    two's loader workers do) would hold pytest at exit until CI's time limit, after every test had passed.
    """
    yield
    gc.collect()  # a loader iterator held in a reference cycle shuts its workers down when collected
    deadline = time.monotonic() + WORKER_EXIT_S
    while (left := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in left:
        process.kill()
        process.join(WORKER_EXIT_S)
    assert not left, f"worker processes outlived the test by {WORKER_EXIT_S} s: {left}"


@pytest.fixture
def sigterm_not_taken() -> Iterator[Callable]:
    """While the test runs, a SIGTERM that the code under test does not take fails the test instead of killing
    pytest; yields that handler, to check the code put it back."""
    def not_taken(*_args) -> None:
        raise AssertionError("SIGTERM was not taken")

    outside = signal.signal(signal.SIGTERM, not_taken)
    try:
        yield not_taken
    finally:
        signal.signal(signal.SIGTERM, outside)


@pytest.fixture(scope="session")
def fmnist() -> IdxSource:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (see README)")
    return IdxSource(FASHION_MNIST_DIR)


@pytest.fixture(scope="session")
def shards_dir(fmnist: IdxSource, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shots per class, 16 train images per class, 5 val and 10 test per class: 430 images, 32 per shard."""
    out = tmp_path_factory.mktemp("shards")
    splits = split_source(fmnist, shots=4, val_per_class=5, test_per_class=10, max_train_per_class=16, seed=1)
    write_shards(fmnist, splits, out, shard_size=SHARD_SIZE)
    return out


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CLIP, saved as a state dict and loaded back through open_clip's file path."""
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("dho-tiny-clip")
    path = tmp_path_factory.mktemp("teacher") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


def write_config(path: Path, shards: Path, teacher_file: Path, **sections: dict) -> Path:
    """A pipeline.yaml for the test slice; `sections` override single keys per section."""
    doc = {
        "data": {"shards": str(shards), "num_workers": 0},
        "teacher": {"model": "dho-tiny-clip", "pretrained": str(teacher_file), "templates": "fashion-mnist",
                    "batch_size": 64},
        "views": {"count": 3, "seed": 0},
        "cache": {"root": str(path.parent / "cache")},
    }
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(doc))
    load_config(path)  # fail here, not later, if the test wrote a bad config
    return path


@pytest.fixture(scope="session")
def trained_teacher_file(fmnist: IdxSource, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny CLIP, pretrained for 5 epochs on 2,000 training images: far better than chance, not perfect.

    Trained once per test run: pytest-xdist's workers share it (the first to ask trains it, holding a lock).
    """
    from dho_pipeline.teacher.templates import TEMPLATES
    from dho_pipeline.teacher.tiny_clip import pretrain_tiny_clip

    folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = folder.parent  # this run's folder, above each worker's own
    path = folder / "tiny-clip-trained.pt"
    with open(folder / "tiny-clip-trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            images, labels = fmnist.images["train"][-2000:], fmnist.labels["train"][-2000:]
            pretrain_tiny_clip(images, labels, fmnist.class_names, TEMPLATES["fashion-mnist"], path, epochs=5,
                               batch_size=64, progress=False)
    return path


@pytest.fixture(scope="session")
def cached_store(shards_dir: Path, teacher_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finished store of the test slice (default settings of write_config), shared: never change it."""
    from stages import cache_teacher

    config = write_config(tmp_path_factory.mktemp("cached") / "p.yaml", shards_dir, teacher_file)
    return cache_teacher.run(load_config(config)).path


class RunsCodeOnLoad:
    """Pickles as a call of os.mkdir(marker): what a crafted file could run on an unguarded torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def one_line_error(result: Result, *names: str) -> str:
    """The CLI's error, after checking it failed with exit code 1, no traceback, and one `Error:` line (progress
    bars aside) naming each of `names`."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    message = errors[0].removeprefix("Error: ")
    for name in names:
        assert name in message, (name, message)
    return message


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` (a small disk to fill); skips where mounting is not permitted."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        reason = mounted.stderr.strip()
        if "permission denied" in reason.lower() or "only root" in reason.lower():
            pytest.skip(f"mounting a tmpfs is not permitted here ({reason}): run as root to test a full disk")
        pytest.fail(f"mount -t tmpfs failed: {reason}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def resize_tmpfs(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)
