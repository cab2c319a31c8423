"""Kill -9 trials: SIGKILL the real `dho` command at seeded random moments, rerun it, compare with a clean run.

For each stage: one uninterrupted reference run, then per trial a fresh folder with its own pipeline.yaml,
the command started as a subprocess, killed with SIGKILL (its whole process group) at a random moment, and
run again to the end (train-student with --resume). The result must equal the reference:

* cache-teacher: every array of the Zarr store (NaN equal to NaN) and the store's attributes (fingerprint,
  class names, splits);
* train-student: final.pt's model weights, alpha, beta and step, and metrics.jsonl without its timing field.

Kill moments count from the command's first write into its folder (the store, its lock or its temporary
folder, or the run folder), which follows the seconds of imports that write nothing. Every fourth trial falls
in the first 100 ms after it (store creation), the others one in each equal slice of the reference run's time
from its first write to its last (the part of the run where a kill can matter: what follows is the exit); a
trial whose command ends first is reported as not killed. Each line also says what
the kill left behind (shards done, the checkpoint's step). Stage two reads a copy of stage one's reference
store. Every process runs on one thread (see ENV). Usage:

    python benchmarks/kill_trials.py [--trials 20] [--stage cache-teacher|train-student|both] [--seed 0]
                                     [--jobs 1] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import open_clip
import torch
import yaml

from dho_pipeline.data.shards import write_shards
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource
from dho_pipeline.data.splits import split_source
from dho_pipeline.store.zarr_store import TeacherStore
from dho_pipeline.student.checkpoint import load_checkpoint
from dho_pipeline.teacher.open_clip_teacher import register_model_configs

STAGES = ("cache-teacher", "train-student")
EARLY_S = 0.1  # the window after the first write in which the store is created
TIMING_FIELDS = {"images_per_s"}  # metrics that depend on the clock, not on the run
REPO = Path(__file__).resolve().parents[1]
# One thread a process: the same arithmetic in every run (outputs are compared bit for bit), and no OpenMP
# spin-waiting when the cores are busy (two threads on a loaded 2-core machine run 50x slower).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class Trial:
    """One kill and rerun: when the kill came, whether it landed before the command ended, what differs."""

    stage: str
    index: int
    delay_s: float
    killed: bool
    left: str  # what the killed run left behind
    differences: list[str]

    @property
    def identical(self) -> bool:
        return not self.differences

    def line(self) -> str:
        when = f"killed {self.delay_s:.3f} s after its first write ({self.left})" if self.killed else (
            f"not killed: it ended before {self.delay_s:.3f} s after its first write")
        more = f" and {len(self.differences) - 3} more" if len(self.differences) > 3 else ""
        result = "identical" if self.identical else "DIFFERS: " + "; ".join(self.differences[:3]) + more
        return f"{self.stage} trial {self.index}: {when}, rerun {result}"


@dataclass
class Setup:
    """Shards and teacher file shared by every run, and each stage's reference outputs and duration."""

    root: Path
    shards: Path
    teacher: Path
    reference: dict[str, dict] = field(default_factory=dict)
    duration_s: dict[str, float] = field(default_factory=dict)  # from the first write to the last

    @property
    def store(self) -> Path:
        """The reference store of stage one: stage two's input."""
        return self.root / "reference-cache-teacher" / "work" / "store.zarr"


def make_setup(root: Path) -> Setup:
    """A Fashion-MNIST slice as shards (120 images, 16 a shard) and a random-init tiny CLIP saved as a file."""
    root = Path(root)
    source = IdxSource(FASHION_MNIST_DIR)
    splits = split_source(source, shots=2, val_per_class=2, test_per_class=2, max_train_per_class=8, seed=1)
    write_shards(source, splits, root / "shards", shard_size=16)
    register_model_configs()
    torch.manual_seed(0)
    teacher = root / "tiny-clip.pt"
    torch.save(open_clip.create_model("dho-tiny-clip").state_dict(), teacher)
    return Setup(root, root / "shards", teacher)


def prepare(stage: str, folder: Path, setup: Setup) -> Path:
    """A fresh folder for one run: pipeline.yaml, an empty work/ that the command writes into, stage two's store."""
    work = folder / "work"
    work.mkdir(parents=True)
    store = work / "store.zarr"
    if stage == "train-student":
        store = folder / "store.zarr"
        shutil.copytree(setup.store, store)
    doc = {
        "data": {"shards": str(setup.shards), "num_workers": 0},
        "teacher": {"model": "dho-tiny-clip", "pretrained": str(setup.teacher), "templates": "fashion-mnist",
                    "batch_size": 64},
        "views": {"count": 8, "seed": 0},
        "cache": {"root": str(work / "cache"), "store": str(store)},
        "student": {"model": "test_resnet", "image_size": 32},
        "train": {"method": "dho", "steps": 24, "batch_labelled": 8, "batch_unlabelled": 8, "lr": 2e-3,
                  "log_every": 2, "checkpoint_every": 5, "out_dir": str(work / "run"), "device": "cpu"},
    }
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    return folder


def start(stage: str, folder: Path, resume: bool = False) -> subprocess.Popen:
    """The real CLI on the folder's config, in its own process group, printing to the folder's output.log."""
    command = [sys.executable, "-m", "dho_pipeline.cli", stage, "-c", str(folder / "pipeline.yaml")]
    with open(folder / "output.log", "ab") as log:
        return subprocess.Popen(command + ["--resume"] * resume, cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def first_write(process: subprocess.Popen, work: Path, poll_s: float = 0.002) -> float | None:
    """The time when `work` first holds anything, or None if the command ended before it wrote."""
    while process.poll() is None:
        if any(work.iterdir()):
            return time.time()
        time.sleep(poll_s)
    return None


def last_write(work: Path) -> float:
    """The time of the latest change under `work`: a file written, an entry added or removed (a lock let go)."""
    return max(p.stat().st_mtime for p in [work, *work.rglob("*")])


def finish(process: subprocess.Popen, folder: Path) -> None:
    """Wait for the command; a failure raises with the last line it printed."""
    if process.wait() != 0:
        last = ((folder / "output.log").read_text().strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit code {process.returncode} in {folder}: {last}")


def outputs(stage: str, folder: Path) -> dict[str, object]:
    """What a finished run produced, by name: store arrays and attributes, or final weights and metrics."""
    work = folder / "work"
    if stage == "cache-teacher":
        store = TeacherStore.open(work / "store.zarr")
        found: dict[str, object] = {f"array {name}": array[:] for name, array in store.group.arrays()}
        found["attributes"] = store.attrs
        return found
    final = load_checkpoint(work / "run" / "final.pt")
    found = {f"weight {name}": tensor for name, tensor in final["model"].items()}
    found.update({key: final[key] for key in ("alpha", "beta", "step")})
    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    found["metrics.jsonl"] = [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]
    return found


def same(a: object, b: object) -> bool:
    """Equal values; arrays and tensors element by element (same shape and dtype), NaN equal to NaN."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return (a.shape == b.shape and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def differences(reference: dict[str, object], found: dict[str, object]) -> list[str]:
    """Names of the outputs that are missing, extra or unequal."""
    return [name for name in sorted(reference.keys() | found.keys())
            if name not in reference or name not in found or not same(reference[name], found[name])]


def run_reference(stage: str, setup: Setup) -> None:
    """One uninterrupted run of `stage`: its outputs and the time from its first write to its last go into `setup`."""
    folder = prepare(stage, setup.root / f"reference-{stage}", setup)
    process = start(stage, folder)
    began = first_write(process, folder / "work")
    finish(process, folder)
    if began is None:
        raise RuntimeError(f"{stage} in {folder} ended without writing anything")
    setup.duration_s[stage] = last_write(folder / "work") - began
    setup.reference[stage] = outputs(stage, folder)


def kill_delays(trials: int, duration_s: float, seed: int, span: float = 1.0) -> list[float]:
    """Seeded kill moments after the first write: every fourth in its first 100 ms (store creation), the others
    one in each equal slice of the first `span` of the reference run's writing time."""
    rng = random.Random(seed)
    spread = [i for i in range(trials) if i % 4]
    delays = {i: rng.uniform(0, EARLY_S) for i in range(0, trials, 4)}
    delays |= {i: rng.uniform(j, j + 1) / len(spread) * span * duration_s for j, i in enumerate(spread)}
    return [delays[i] for i in range(trials)]


def left_behind(stage: str, folder: Path) -> str:
    """What a killed run left in its folder: how far the store or the checkpoints got."""
    work = folder / "work"
    try:
        if stage == "cache-teacher":
            if not (work / "store.zarr").exists():
                return "no store yet" + "".join(f", {p.name}" for p in sorted(work.iterdir()))
            store = TeacherStore.open(work / "store.zarr")
            done = store.group["done"][:]
            shards = [done[first: first + count].all() for ranges in store.attrs["splits"].values()
                      for first, count in ranges]
            return f"store with {sum(shards)}/{len(shards)} shards done"
        run = work / "run"
        if (run / "final.pt").exists():
            return "final.pt written"
        if (run / "last.pt").exists():
            return f"last.pt at step {load_checkpoint(run / 'last.pt')['step']}"
        return "no checkpoint yet"
    except Exception as e:
        return f"unreadable: {type(e).__name__}: {e}"


def kill_trial(stage: str, setup: Setup, index: int, delay_s: float) -> Trial:
    """Start `stage`, SIGKILL it `delay_s` after its first write, rerun it to the end, compare with the reference."""
    folder = prepare(stage, setup.root / f"trial-{stage}-{index:03d}", setup)
    process = start(stage, folder)
    began = first_write(process, folder / "work")
    if began is not None:
        time.sleep(max(0.0, began + delay_s - time.time()))
        os.killpg(process.pid, signal.SIGKILL)  # a zombie leader keeps the group: no race with its exit
    killed = process.wait() == -signal.SIGKILL
    left = left_behind(stage, folder)
    if not killed and process.returncode != 0:
        return Trial(stage, index, delay_s, killed, left,
                     [f"the first run failed with exit code {process.returncode}"])
    try:
        finish(start(stage, folder, resume=stage == "train-student"), folder)
    except RuntimeError as e:
        return Trial(stage, index, delay_s, killed, left, [f"the rerun failed: {e}"])
    try:
        found = outputs(stage, folder)
    except Exception as e:
        return Trial(stage, index, delay_s, killed, left, [f"the rerun's outputs do not open: {type(e).__name__}: {e}"])
    return Trial(stage, index, delay_s, killed, left, differences(setup.reference[stage], found))


def ensure_reference(stage: str, setup: Setup) -> None:
    """Run the stage's reference once (for stage two, stage one's first: its store is stage two's input)."""
    if stage == "train-student":
        ensure_reference("cache-teacher", setup)
    if stage not in setup.reference:
        run_reference(stage, setup)


def run_trials(stage: str, setup: Setup, delays: list[float], jobs: int = 1,
               log: Callable[[str], None] = print) -> list[Trial]:
    """A kill trial at each delay, `jobs` at a time, after the stage's reference; one line logged per trial."""
    ensure_reference(stage, setup)
    trials = []
    with ThreadPoolExecutor(jobs) as pool:
        for trial in pool.map(lambda i: kill_trial(stage, setup, i, delays[i]), range(len(delays))):
            trials.append(trial)
            log(trial.line())
    return trials


def summary(stage: str, trials: list[Trial]) -> str:
    same_count = sum(t.identical for t in trials)
    killed = sum(t.killed for t in trials)
    return f"{stage}: {same_count}/{len(trials)} identical ({killed} killed before the end)"


@click.command()
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Kill trials per stage.")
@click.option("--stage", type=click.Choice([*STAGES, "both"]), default="both", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the kill moments.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials run at once (one thread each); side by side runs are slower than the reference, so "
                   "kills land earlier in their progress.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work in this new folder and keep it (default: a temporary folder, removed at the end).")
def main(trials: int, stage: str, seed: int, jobs: int, keep: Path | None) -> None:
    """Kill each stage at random moments, rerun it, and check the result equals an uninterrupted run."""
    with tempfile.TemporaryDirectory(prefix="dho-kill-") as tmp:
        root = keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        setup = make_setup(root)
        results = {}
        for name in STAGES if stage == "both" else (stage,):
            ensure_reference(name, setup)
            click.echo(f"{name}: reference run writes for {setup.duration_s[name]:.2f} s (first write to last)")
            delays = kill_delays(trials, setup.duration_s[name], seed)
            results[name] = run_trials(name, setup, delays, jobs, log=click.echo)
        for name, done in results.items():
            click.echo(summary(name, done))
    if not all(t.identical for done in results.values() for t in done):
        sys.exit(1)


if __name__ == "__main__":
    main()
