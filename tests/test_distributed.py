"""gloo processes under torchrun on the CPU: the same store as one process at any world size, a stage one
stopped at one world size and finished at another, and a DDP student run whose ranks all take every step, with
more ranks than some splits have shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from dho_pipeline.config import load_config
from dho_pipeline.data.shards import write_shards
from dho_pipeline.data.splits import split_source
from dho_pipeline.store.zarr_store import TeacherStore
from dho_pipeline.student.checkpoint import load_checkpoint
from stages import cache_teacher
from tests.conftest import write_config

# Loaded by every process of torchrun(..., slow_ranks=folder): ranks other than 0 open a store for writing only
# once rank 0 has finished a shard more (60 s at most), as a rank on a busy machine may
SLOW_RANKS = """
import os, time
from dho_pipeline.store.zarr_store import TeacherStore
opened = TeacherStore.open.__func__

def slow_open(cls, path, mode="r"):
    if mode == "a" and os.environ.get("RANK", "0") != "0":
        store = opened(cls, path)
        done = lambda: sum(store.shard_done(s) for s in store.shards())
        before, deadline = done(), time.monotonic() + 60
        while done() == before and time.monotonic() < deadline:
            time.sleep(0.05)
    return opened(cls, path, mode)

TeacherStore.open = classmethod(slow_open)
"""


REPOSITORY = Path(__file__).parents[1]


def torchrun(*args: str, ranks: int = 2, slow_ranks: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "dho_pipeline.cli", *args]
    env = dict(os.environ)
    if slow_ranks is not None:
        slow_ranks.mkdir()
        (slow_ranks / "sitecustomize.py").write_text(SLOW_RANKS)
        # the repository too: sitecustomize imports dho_pipeline before `-m` puts the working folder on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(slow_ranks), str(REPOSITORY), env.get("PYTHONPATH")]))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPOSITORY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def same_store(a: Path, b: Path) -> None:
    x, y = TeacherStore.open(a), TeacherStore.open(b)
    for name in ("logits", "boxes", "flips", "labels", "bad", "done", "checksums"):
        np.testing.assert_array_equal(x.group[name][:], y.group[name][:], err_msg=name)


def test_two_ranks_create_and_write_the_same_store_as_one_process(shards_dir, teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file)
    single = cache_teacher.run(load_config(config, [f"cache.store={tmp_path / 'single.zarr'}"])).path
    torchrun("cache-teacher", "-c", str(config), "--set", f"cache.store={tmp_path / 'ranks.zarr'}")
    same_store(single, tmp_path / "ranks.zarr")


def test_world_sizes_that_do_not_divide_the_shards(fmnist, teacher_file, tmp_path):
    splits = split_source(fmnist, shots=4, val_per_class=5, test_per_class=10, max_train_per_class=16, seed=1)
    shards = write_shards(fmnist, splits, tmp_path / "shards", shard_size=48)
    assert len(shards.shards()) == 9  # 1 labelled, 3 unlabelled, 2 val, 3 test
    config = write_config(tmp_path / "p.yaml", tmp_path / "shards", teacher_file,
                          student={"model": "resnet10t", "image_size": 32},
                          train={"steps": 5, "batch_labelled": 8, "batch_unlabelled": 8, "log_every": 1,
                                 "out_dir": str(tmp_path / "run")})
    single = cache_teacher.run(load_config(config, [f"cache.store={tmp_path / 'single.zarr'}"])).path

    resumed = load_config(config, [f"cache.store={tmp_path / 'resumed.zarr'}"])
    cache_teacher.run(resumed, max_shards=4)  # stopped after 4 shards by one process ...
    partial = TeacherStore.open(tmp_path / "resumed.zarr")
    assert sum(partial.shard_done(s) for s in partial.shards()) == 4
    torchrun("cache-teacher", "-c", str(config), "--set", f"cache.store={tmp_path / 'resumed.zarr'}", ranks=3,
             slow_ranks=tmp_path / "slow")  # ... finished by 3 ranks (5 shards left), 2 of them slow to start
    same_store(single, tmp_path / "resumed.zarr")

    torchrun("train-student", "-c", str(config), "--set", f"cache.store={tmp_path / 'resumed.zarr'}", ranks=4)
    # DDP all-reduces every step and final.pt gathers every rank's RNG state after the last one: a rank that
    # ran out of data or stopped early would hang the others into the timeout instead
    final = load_checkpoint(tmp_path / "run" / "final.pt")
    assert final["step"] == 5 and len(final["rng"]) == 4
