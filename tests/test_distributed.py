"""Two gloo processes under torchrun on the CPU: the same store as one process, and a DDP student run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from dho_pipeline.config import load_config
from dho_pipeline.store import TeacherStore
from stages import cache_teacher
from tests.conftest import write_config


def torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dho_pipeline.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_ranks_write_the_same_store_and_train(shards_dir, teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file,
                          student={"model": "resnet10t", "image_size": 32},
                          train={"steps": 4, "batch_labelled": 8, "batch_unlabelled": 8, "log_every": 2,
                                 "out_dir": str(tmp_path / "run")})
    single = cache_teacher.run(load_config(config, [f"cache.store={tmp_path / 'single.zarr'}"])).path
    torchrun("cache-teacher", "-c", str(config), "--set", f"cache.store={tmp_path / 'ranks.zarr'}")
    a, b = TeacherStore.open(single), TeacherStore.open(tmp_path / "ranks.zarr")
    for name in ("logits", "boxes", "flips", "labels", "done"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)

    torchrun("train-student", "-c", str(config), "--set", f"cache.store={tmp_path / 'ranks.zarr'}")
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    assert final["step"] == 4 and len(final["rng"]) == 2
