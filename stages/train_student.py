"""Stage two: train the dual-head student from the cached teacher logits (or, for comparison, online).

Each step takes B_l labelled and B_u unlabelled samples, each with one of its cached views replayed at
the student's resolution and the teacher's logits for that view read from the store. The teacher runs
only in the online mode (teacher.mode: online), which shares every other line of this recipe.
Checkpoints hold model, optimiser, scheduler, step and RNG states; the loaders resume by arithmetic
from the step, so a resumed run continues exactly where the killed one stopped.

As in torchtune's recipes, `run` is the recipe in order: named setup functions (data and store, teacher,
student and optimiser, resume state, loaders), then the training loop and its step. A loss or weights
that stop being finite end the run at that step, before any checkpoint holds them.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dho_pipeline.config import PipelineConfig, TrainConfig
from dho_pipeline.data.loader_workers import end_workers, start_loader
from dho_pipeline.data.shards import Manifest, ShardDataError, load_manifest
from dho_pipeline.data.student_stream import StreamSpec, StudentStream, clean_batches
from dho_pipeline.data.views import normalize
from dho_pipeline.errors import CheckpointError, DhoError, one_line, warn
from dho_pipeline.metrics_log import MetricsLog
from dho_pipeline.runtime import HostCopy, Runtime, autocast, init_runtime
from dho_pipeline.stop_request import StopRequest
from dho_pipeline.store.lock import rank_zero_lock
from dho_pipeline.store.lookup import find_store, view_recipe
from dho_pipeline.store.zarr_store import StoreError, field_value, fingerprint_diff
from dho_pipeline.student.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dho_pipeline.student.evaluation import accuracy, combine, head_outputs, search_alpha_beta
from dho_pipeline.student.losses import TopKLogits, training_loss
from dho_pipeline.student.model import DualHeadStudent, StudentData, build_student, check_student_config
from dho_pipeline.student.schedule import make_scheduler
from dho_pipeline.teacher.open_clip_teacher import Teacher, load_teacher
from dho_pipeline.teacher.templates import resolve_templates
from dho_pipeline.teacher.tip_adapter import attach_adapter
from dho_pipeline.tensorboard_log import require_tensorboard


class TrainingDiverged(DhoError):
    """The loss or the weights stopped being finite; the message names the step, its shards and the checkpoint kept."""


class RunFolderTaken(DhoError):
    """train.out_dir holds another run's checkpoints and the command neither continues (--resume) nor replaces it."""


class TrainingStopped(DhoError):
    """SIGINT or SIGTERM stopped training after a whole step, and last.pt holds that step."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal_number = signal_number


class NothingToResume(DhoError):
    """--resume names a train.out_dir where no run was ever started (a typo, another config?)."""


class ResumeMismatch(DhoError):
    """--resume with settings that would continue the run as another one than it started as."""

    def __init__(self, message: str, differences: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.differences = list(differences)  # each setting or input that differs, 'train.lr 0.001 -> 0.1'


# Settings --resume takes changed, because the continued run computes the same with them. The rest must be the
# run's: the data order (batch sizes, seed, data.num_workers: the stream splits batches over workers), the
# method and its schedule (train.steps and epochs too: the lr schedule spans the run's steps, so a longer run is
# a new run), the student, the teacher and the eval settings that pick final.pt's alpha and beta.
RESUME_FREE = {
    # where the run folder is, and when and where numbers and checkpoints are written
    "train.out_dir", "train.log_every", "train.checkpoint_every", "train.tensorboard",
    # where and how the same arithmetic runs: a run may continue on another machine (it then matches an
    # uninterrupted run up to rounding, and amp: auto follows the device)
    "train.device", "train.compile", "train.channels_last",
    # batch sizes of passes that do not train: validation, and the teacher's own passes (same logits)
    "eval.batch_size", "teacher.batch_size",
    # where the inputs are; what they hold is compared instead (the shards' hashes, the store's fingerprint)
    "data.shards", "cache.root", "cache.store",
    # the student's initial weights: a resumed run takes its weights from last.pt
    "student.pretrained_file",
}
# The teacher's weights and adapter: compared by what they hold instead of where they are, through the store's
# fingerprint (cached logits) or the online teacher's sha256s, so a run may continue where they lie elsewhere.
# (teacher.model_config_dir stays compared by path: no fingerprint holds the model config it gives.)
TEACHER_FILES = {"teacher.pretrained", "teacher.adapter.file"}


# Every file train-student writes in train.out_dir (TensorBoard's event files by pattern): what --overwrite removes.
RUN_FILES = ("last.pt", "last.pt.tmp", "final.pt", "final.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp")
TENSORBOARD_FILES = "events.out.tfevents.*"


@dataclass(frozen=True)
class RunContext:
    """What every part of a run reads: the config, this process's place, the shards, the store, the step budget."""

    cfg: PipelineConfig
    runtime: Runtime
    manifest: Manifest
    store_path: str | None  # None: online mode with fresh views, drawn instead of replayed
    steps_per_epoch: int
    total_steps: int
    store_fingerprint: str | None = None  # the store's fingerprint hash, kept in every checkpoint
    val_bad_rows: frozenset[int] = frozenset()  # val rows the store marks bad: left out of val, as in training

    @property
    def online(self) -> bool:
        return self.cfg.teacher.mode == "online"

    @property
    def shards_fingerprint(self) -> str:
        """A hash of every shard's name, rows and sha256: the same data wherever the shards are."""
        return self.manifest.fingerprint_hash()


@dataclass
class Student:
    """The model in training and the states a checkpoint saves and restores with it."""

    model: DualHeadStudent
    data: StudentData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


@dataclass
class StepInputs:
    """One step's batch on the device: images (labelled first), labels, teacher logits, and the rows it holds."""

    images: torch.Tensor
    labels: torch.Tensor
    teacher_l: torch.Tensor | TopKLogits | None
    teacher_u: torch.Tensor | TopKLogits | None
    rows: torch.Tensor


def run(cfg: PipelineConfig, resume: bool = False, overwrite: bool = False, max_steps: int | None = None) -> Path:
    """Train (or continue training) the student of `cfg`; returns the run folder. `max_steps` stops early.

    A new run refuses a train.out_dir that holds another run's checkpoints unless `overwrite` removes its files.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if cfg.train.tensorboard:
        require_tensorboard()  # before the run folder is made
    ctx = setup_data(cfg)
    check_student_config(cfg.student, cfg.base_dir)  # before the run folder is made
    # one run per folder: a second would interleave metrics.jsonl and overwrite the first one's checkpoints
    with rank_zero_lock(cfg.path(cfg.train.out_dir), ctx.runtime, hidden=True):
        checkpoints = Checkpoints(ctx)
        if resume:
            checkpoints.check_resumable()
        else:
            checkpoints.claim_folder(overwrite)
        teacher = setup_teacher(ctx)
        checkpoints.online_teacher = teacher.fingerprint if teacher else None
        student = setup_student(ctx)
        start_step = checkpoints.restore(student) if resume else 0
        if start_step == ctx.total_steps and (checkpoints.out_dir / "final.pt").exists():
            return checkpoints.out_dir  # a finished run resumed: nothing left to train, and final.pt is its own
        if start_step == 0:
            warn_if_clip_student_starts_random(ctx)
        metrics = MetricsLog(checkpoints.out_dir / "metrics.jsonl", start_step, ctx.runtime.is_main,
                             cfg.train.tensorboard)
        feed = setup_loaders(ctx, teacher, student.data, start_step)
        stop = ctx.total_steps if max_steps is None else min(ctx.total_steps, start_step + max_steps)
        try:
            train(ctx, student, feed, checkpoints, metrics, range(start_step, stop))
        finally:
            try:
                feed.close()
            finally:
                metrics.close()
        if stop == ctx.total_steps:
            save_final(ctx, student, checkpoints)
    ctx.runtime.barrier()
    return checkpoints.out_dir


def setup_data(cfg: PipelineConfig) -> RunContext:
    """Join torchrun's processes, read the shard manifest (its shards all there), find the store, count the steps."""
    runtime = init_runtime(cfg.train.device)
    manifest = load_manifest(cfg.location(cfg.data.shards))
    manifest.check_files(manifest.shards())
    if cfg.train.method != "ce_only" and not manifest.splits.get("unlabelled"):
        raise ShardDataError(f"{manifest.root} has no unlabelled split: train.method {cfg.train.method} distils the "
                             "teacher on unlabelled images; make shards with some (make-shards --max-train-per-class "
                             "above --shots), or train.method ce_only")
    fresh = cfg.teacher.mode == "online" and cfg.teacher.online_views == "fresh"
    store = None if fresh else find_store(cfg, manifest)
    steps_per_epoch, total_steps = step_budget(cfg.train, manifest, runtime.world_size)
    if store is not None and cfg.train.method != "ce_only" and runtime.is_main:
        warn_if_views_run_out(store.num_views - 1, total_steps / steps_per_epoch)
    if cfg.train.method == "dho" and not manifest.splits.get("val") and runtime.is_main:
        warn(f"{manifest.root} has no val split, so final.pt keeps the default alpha {cfg.eval.default_alpha} and "
             f"beta {cfg.eval.default_beta} (eval.default_alpha/beta) instead of searching them: make shards with "
             "a val split (dho make-shards ... --val-per-class N) to search them")
    return RunContext(cfg, runtime, manifest, str(store.path) if store else None, steps_per_epoch, total_steps,
                      store.attrs["fingerprint_hash"] if store else None,
                      store.bad_rows(manifest.splits.get("val", [])) if store else frozenset())


def warn_if_views_run_out(random_views: int, passes: float) -> None:
    """Warn when the run passes over the unlabelled images more often than the store has views of each.

    Each view's logits are then replayed, and the student fits them rather than the teacher: with 30 passes
    over 2,000 images, DHO lost 0.34 points at 16 views and 4.8 at 1, and matched the online teacher at 32
    (BENCHMARKS.md, "Cached views against the online teacher").
    """
    if passes > random_views:
        warn(f"this run makes {passes:g} passes over the unlabelled images but the store holds {random_views} "
             f"random views of each, so each view's logits are used about {passes / random_views:.1f} times; "
             f"a store with views.count >= {math.ceil(passes)} trains a better student over this many passes")


def step_budget(tc: TrainConfig, manifest: Manifest, world_size: int) -> tuple[int, int]:
    """(steps per epoch, steps of the run).

    An epoch is a pass over the unlabelled split for every method, so CE-only gets the same step budget
    (and validation cadence) as the distilled students; without unlabelled images, over the labelled split.
    """
    split, batch_size = ("unlabelled", tc.batch_unlabelled) if manifest.split_count("unlabelled") else (
        "labelled", tc.batch_labelled)
    steps_per_epoch = math.ceil(manifest.split_count(split) / (batch_size * world_size))
    return steps_per_epoch, tc.steps or math.ceil(tc.epochs * steps_per_epoch)


def setup_teacher(ctx: RunContext) -> Teacher | None:
    """The teacher (with its Tip-Adapter, if any) in online mode; None when its logits come from the store."""
    if not ctx.online:
        return None
    teacher = load_teacher(ctx.cfg.teacher, ctx.manifest.class_names, ctx.runtime.device, ctx.cfg.base_dir)
    attach_adapter(teacher, ctx.cfg, ctx.manifest, ctx.runtime)
    return teacher


def setup_student(ctx: RunContext) -> Student:
    """The student seeded with train.seed on the device, AdamW, the lr schedule and the fp16 grad scaler."""
    cfg, tc, device = ctx.cfg, ctx.cfg.train, ctx.runtime.device
    torch.manual_seed(tc.seed)
    templates = resolve_templates(cfg.teacher.templates, cfg.teacher.extra_templates)
    model, data = build_student(cfg.student, ctx.manifest.class_names, templates, cfg.base_dir)
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = make_scheduler(optimizer, ctx.total_steps, tc.warmup, tc.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
    return Student(model, data, optimizer, scheduler, scaler)


def warn_if_clip_student_starts_random(ctx: RunContext) -> None:
    """An open_clip student without its CLIP weights starts from random towers: almost never what is meant."""
    student = ctx.cfg.student
    if student.kind == "open_clip" and not student.pretrained_file and ctx.runtime.is_main:
        warn(f"student.kind open_clip without student.pretrained_file: the {student.model} image tower starts "
             "random and both heads start from a random text tower's class embeddings; give the CLIP weights "
             "file as student.pretrained_file (DHO's recipe distils into a pretrained CLIP)")


class Checkpoints:
    """The run folder's last.pt and final.pt; remembers the last good checkpoint (resumed from or written)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.out_dir = ctx.cfg.path(ctx.cfg.train.out_dir)
        self.last = self.out_dir / "last.pt"
        self.last_step: int | None = None
        self.online_teacher: dict | None = None  # the online teacher's fingerprint, once it is loaded

    def claim_folder(self, overwrite: bool) -> None:
        """Make the run folder a new run's: refuse one that holds a run's checkpoints, or with `overwrite` remove
        every file a run wrote there (other files stay). The folder is made at once, so a run killed while it sets
        up can be resumed (at step 0). Rank 0 decides; every rank raises the same error."""
        refusal = None
        if self.ctx.runtime.is_main:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                refusal = f"{self.out_dir} (train.out_dir) is a file, not a folder: choose another train.out_dir"
            elif overwrite:
                for path in run_files(self.out_dir):
                    path.unlink()
            elif self.last.exists() or (self.out_dir / "final.pt").exists():
                refusal = (f"{self.out_dir} holds a run ({self.described_run()}): continue it with --resume, or start "
                           "over with --overwrite, or choose another train.out_dir")
            if refusal is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
        refusal = self.ctx.runtime.broadcast(refusal)
        if refusal:
            raise RunFolderTaken(refusal)

    def check_resumable(self) -> None:
        """NothingToResume unless the folder holds last.pt or a run stopped before its first checkpoint (an empty
        folder, or metrics.jsonl alone: kill -9 can land there), which starts again at step 0 with a warning."""
        refusal = None
        if self.ctx.runtime.is_main and not self.last.exists():
            folder = self.out_dir
            if (folder / "final.pt").exists():
                refusal = (f"--resume: {folder} holds a finished run (final.pt) and no last.pt: nothing to resume; "
                           "start over with --overwrite, or choose another train.out_dir")
            elif folder.is_dir() and ((folder / "metrics.jsonl").exists() or not any(folder.iterdir())):
                warn(f"--resume: no last.pt in {folder} yet (the run stopped before its first checkpoint): "
                     "starting at step 0")
            else:
                refusal = f"--resume: no last.pt in {folder}: nothing to resume (drop --resume to start a new run)"
        refusal = self.ctx.runtime.broadcast(refusal)
        if refusal:
            raise NothingToResume(refusal)

    def described_run(self) -> str:
        """How far the run in the folder got, e.g. 'step 40 of 42', from its last.pt (or final.pt)."""
        path = self.last if self.last.exists() else self.out_dir / "final.pt"
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            return f"{path.name} is not readable"
        total = state.get("total_steps")
        return f"step {state['step']}" + (f" of {total}" if total else "")

    def restore(self, student: Student) -> int:
        """Load last.pt, when there is one, into `student` and this process's RNGs; its step, else 0."""
        if not self.last.exists():
            return 0
        try:
            state = load_checkpoint(self.last)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; --resume cannot continue from a damaged last.pt: put back a copy of it, or "
                                  "start over with --overwrite") from e
        self.refuse_other_settings(state)
        ranks, world_size = len(state["rng"]), self.ctx.runtime.world_size
        if ranks != world_size:  # the loaders split the data by rank: another world size reads another order
            raise CheckpointError(f"{self.last}: written by {ranks} process(es), resumed with {world_size}; resume "
                                  f"with the same number (torchrun --nproc_per_node {ranks}) to continue exactly")
        student.model.load_state_dict(state["model"])
        student.optimizer.load_state_dict(state["optimizer"])
        student.scheduler.load_state_dict(state["scheduler"])
        student.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.ctx.runtime.rank])
        self.last_step = state["step"]
        return state["step"]

    def refuse_other_settings(self, state: dict) -> None:
        """ResumeMismatch naming each setting (and input) of this run that differs from the checkpoint's run."""
        ctx = self.ctx
        recorded, now = flat_config(state["config"]), flat_config(ctx.cfg.to_dict())
        free = RESUME_FREE | TEACHER_FILES if "online_teacher" in state else RESUME_FREE  # older last.pt: paths
        differ = [f"{key} {recorded[key]!r} -> {now[key]!r}" for key in recorded.keys() & now.keys()
                  if key not in free and recorded[key] != now[key]]
        then, online = state.get("online_teacher"), self.online_teacher
        if isinstance(then, dict) and isinstance(online, dict):
            then, online = teacher_identity(then), teacher_identity(online)
            differ += [f"the online teacher's {name} {field_value(then, name)} -> {field_value(online, name)}"
                       for name in fingerprint_diff(then, online)]
        if state.get("shards_fingerprint", ctx.shards_fingerprint) != ctx.shards_fingerprint:
            differ.append(f"the shards ({state['shards']} -> {ctx.manifest.root}: other files)")
        if state.get("store_fingerprint", ctx.store_fingerprint) != ctx.store_fingerprint:  # older: not kept
            differ.append(f"the teacher store ({state['store']} -> {ctx.store_path}: other logits)")
        if differ:
            raise ResumeMismatch(f"{self.last}: --resume with other settings than the run's (last.pt -> now): "
                                 f"{', '.join(sorted(differ))}; resume with the run's settings, or start a new run "
                                 "with --overwrite or another train.out_dir", sorted(differ))

    def save(self, student: Student, step: int, path: Path | None = None, **extra) -> None:
        """Write last.pt (or `path`) from rank 0, with every rank's RNG state and `extra` keys."""
        ctx = self.ctx
        states = [None] * ctx.runtime.world_size
        if ctx.runtime.world_size > 1:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if ctx.runtime.is_main:
            save_checkpoint(path or self.last, {
                "model": student.model.state_dict(), "optimizer": student.optimizer.state_dict(),
                "scheduler": student.scheduler.state_dict(), "scaler": student.scaler.state_dict(), "step": step,
                "rng": states, "config": ctx.cfg.to_dict(), "class_names": ctx.manifest.class_names,
                "student_data": student.data.__dict__, "store": ctx.store_path,
                "store_fingerprint": ctx.store_fingerprint, "shards": str(ctx.manifest.root),
                "total_steps": ctx.total_steps, "shards_fingerprint": ctx.shards_fingerprint,
                "online_teacher": self.online_teacher, **extra,
            })
        if path is None:
            self.last_step = step

    def kept(self) -> str:
        """Which checkpoint a stopped run can go back to, in words."""
        if self.last_step is None:
            return "no checkpoint of this run was written yet"
        return f"the last good checkpoint {self.last} (step {self.last_step}) is kept"


def teacher_identity(fingerprint: dict) -> dict:
    """What an online teacher's fingerprint says it is, for --resume: its dtype left out (teacher.dtype auto
    follows the device, which may change) and a file's name too (its sha256 says what it holds)."""
    by_file = fingerprint.get("checkpoint_sha256") is not None
    return {k: v for k, v in fingerprint.items() if k != "dtype" and not (by_file and k == "pretrained")}


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """`config` (PipelineConfig.to_dict) as {"train.lr": 0.001, ...}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_files(out_dir: Path) -> list[Path]:
    """The files in `out_dir` that train-student writes (checkpoints, metrics, TensorBoard events)."""
    if not out_dir.is_dir():
        return []
    return [p for p in (out_dir / name for name in RUN_FILES) if p.exists()] + sorted(out_dir.glob(TENSORBOARD_FILES))


def setup_loaders(ctx: RunContext, teacher: Teacher | None, data: StudentData, start_step: int) -> StepFeed:
    """The endless labelled and (but for CE-only) unlabelled loaders, resumed at `start_step` by arithmetic."""
    cfg, tc, runtime = ctx.cfg, ctx.cfg.train, ctx.runtime
    spec = StreamSpec(
        student_size=data.image_size, seed=tc.seed, cached_logits=not ctx.online,
        teacher_size=teacher.image_size if teacher else None,
        fresh_views=view_recipe(cfg) if ctx.store_path is None else None, skip_bad=cfg.data.on_bad_image == "skip",
    )

    def stream(split: str, batch_size: int) -> StudentStream:
        return StudentStream(ctx.manifest.splits[split], ctx.store_path, spec, batch_size, runtime.rank,
                             runtime.world_size, start_batch=start_step)

    def loader(dataset: StudentStream) -> Iterator[dict]:
        return start_loader(dataset, cfg.data.num_workers, runtime.device.type == "cuda",
                            deaf=StopRequest.possible(runtime))

    # Both streams are built (and their stores checked) before any worker starts.
    labelled = stream("labelled", tc.batch_labelled)
    unlabelled = stream("unlabelled", tc.batch_unlabelled) if tc.method != "ce_only" else None
    return StepFeed(loader(labelled), loader(unlabelled) if unlabelled else None, teacher, data, tc, runtime.device)


class StepFeed:
    """Each step's inputs on the device: student views, labels and teacher logits (cached, or run online)."""

    def __init__(self, labelled: Iterator[dict], unlabelled: Iterator[dict] | None, teacher: Teacher | None,
                 data: StudentData, tc: TrainConfig, device: torch.device):
        self.labelled, self.unlabelled, self.teacher = labelled, unlabelled, teacher
        self.data, self.tc, self.device = data, tc, device

    def close(self) -> None:
        """Shut the loader workers down now, however training ended: an error's traceback could keep them
        alive until exit, where workers deaf to SIGTERM would hold the process (dho_pipeline.data.loader_workers).
        """
        end_workers(self.labelled)
        end_workers(self.unlabelled)

    def next(self) -> StepInputs:
        batch_l = next(self.labelled)
        images, labels = self._images(batch_l), batch_l["label"].to(self.device)
        if self.unlabelled is None:
            return StepInputs(images, labels, None, None, batch_l["row"])
        teacher_l = self._teacher_logits(batch_l)
        batch_u = next(self.unlabelled)
        images = torch.cat([images, self._images(batch_u)])
        return StepInputs(images, labels, teacher_l, self._teacher_logits(batch_u),
                          torch.cat([batch_l["row"], batch_u["row"]]))

    def _images(self, batch: dict) -> torch.Tensor:
        x = normalize(batch["images"].to(self.device, non_blocking=True), self.data.mean, self.data.std)
        return x.contiguous(memory_format=torch.channels_last) if self.tc.channels_last else x

    def _teacher_logits(self, batch: dict) -> torch.Tensor | TopKLogits:
        if "teacher_top_values" in batch:  # a top-k store
            return TopKLogits(batch["teacher_top_values"], batch["teacher_top_indices"],
                              batch["teacher_lse"]).to(self.device, non_blocking=True)
        if self.teacher is None:
            return batch["teacher_logits"].to(self.device, non_blocking=True)
        images = batch["teacher_images"].to(self.device, non_blocking=True)  # the teacher runs in teacher.dtype
        return self.teacher.logits(normalize(images, self.teacher.mean, self.teacher.std))


def train(ctx: RunContext, student: Student, feed: StepFeed, checkpoints: Checkpoints, metrics: MetricsLog,
          steps: range) -> None:
    """Run `steps`: log every train.log_every, validate every epoch, write last.pt every train.checkpoint_every.

    A step whose loss, or whose weights at a checkpoint, are not finite stops the run with TrainingDiverged.
    SIGINT or SIGTERM ends the step under way, writes last.pt at it and raises TrainingStopped. A batch that cannot
    be read (a shard damaged since the start, an image that does not decode) stops the run with last.pt written
    at the last step done (keep_steps_done).
    """
    tc, runtime = ctx.cfg.train, ctx.runtime
    net = DistributedDataParallel(student.model) if runtime.world_size > 1 else student.model
    net = torch.compile(net) if tc.compile else net
    net.train()
    val_shards = ctx.manifest.splits.get("val", [])
    tick, seen = time.perf_counter(), 0
    previous: StepResult | None = None
    with StopRequest(runtime) as stop:
        for step in tqdm(steps, desc="train-student", initial=steps.start, total=ctx.total_steps,
                         disable=not runtime.is_main):
            done = step + 1
            try:
                inputs = feed.next()
            except (ShardDataError, StoreError) as error:
                keep_steps_done(ctx, student, checkpoints, previous, error)
            loss, parts = step_loss(net, inputs, tc)
            result = StepResult(done, inputs.rows, HostCopy({"loss": loss.detach(),
                                                             "finite": finite_flag([loss], runtime), **parts}))
            lr = optimizer_step(student, loss, tc)
            if previous is not None:  # read one step late, so the device never waits for the host
                previous.values_or_raise(ctx, checkpoints)
            previous = result
            seen += len(inputs.images)
            if done % tc.log_every == 0 or done == ctx.total_steps:
                values = result.values_or_raise(ctx, checkpoints)
                elapsed = time.perf_counter() - tick
                metrics.write({"step": done, "epoch": done / ctx.steps_per_epoch, **values, "lr": lr,
                               "images_per_s": seen * runtime.world_size / max(elapsed, 1e-9)})
                tick, seen = time.perf_counter(), 0
            if runtime.is_main and val_shards and (done % ctx.steps_per_epoch == 0 or done == ctx.total_steps):
                metrics.write({"step": done, "epoch": done / ctx.steps_per_epoch,
                               "val": validate(student.model, val_shards, student.data, runtime.device, ctx.cfg,
                                               ctx.val_bad_rows)})
            stopping = stop.signal_number is not None and done < steps.stop
            if done % tc.checkpoint_every == 0 or done == steps.stop or stopping:
                save_checked(ctx, student, checkpoints, result)
            if stopping:
                raise TrainingStopped(f"stopped at step {done}: last.pt kept", stop.signal_number)


def keep_steps_done(ctx: RunContext, student: Student, checkpoints: Checkpoints, done: StepResult | None,
                    error: DhoError) -> None:
    """Stop on `error`, a batch that cannot be read, with last.pt written at `done`, the last step done, when it is
    newer than the last checkpoint (one process only: under torchrun, save's collectives would wait for ranks that
    did not fail)."""
    if done is None or done.step == checkpoints.last_step or ctx.runtime.world_size > 1:
        raise error
    save_checked(ctx, student, checkpoints, done)
    raise type(error)(f"{one_line(error)}; last.pt kept at step {done.step}: once the data is fixed, continue with "
                      "train-student --resume") from error


def save_checked(ctx: RunContext, student: Student, checkpoints: Checkpoints, result: StepResult) -> None:
    """last.pt at `result`'s step, once its loss and then the weights are known finite (else TrainingDiverged)."""
    result.values_or_raise(ctx, checkpoints)
    weights = [t for t in student.model.state_dict().values() if t.is_floating_point()]
    if not bool(finite_flag(weights, ctx.runtime)):
        raise diverged(ctx, checkpoints, result.step, result.rows, "the weights are not finite after it")
    checkpoints.save(student, result.step)


@dataclass
class StepResult:
    """One step's loss, its parts and whether the loss was finite on every rank, on their way to the host."""

    step: int
    rows: torch.Tensor
    values: HostCopy

    def values_or_raise(self, ctx: RunContext, checkpoints: Checkpoints) -> dict[str, float]:
        """The loss and its parts; TrainingDiverged naming this step when the loss was not finite on some rank."""
        values = {name: float(v) for name, v in self.values.wait().items()}
        if not values.pop("finite"):
            loss = values["loss"]
            what = f"the loss is {loss}" if not math.isfinite(loss) else "another rank's loss is not finite"
            raise diverged(ctx, checkpoints, self.step, self.rows, what)
        return values


def step_loss(net: torch.nn.Module, inputs: StepInputs,
              tc: TrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The forward pass of one step: the loss of train.method and its parts."""
    with autocast(inputs.images.device, tc.amp):
        ce, kd = net(inputs.images)
    n = len(inputs.labels)
    out_u = (ce[n:], kd[n:]) if inputs.teacher_u is not None else None
    return training_loss(tc.method, (ce[:n], kd[:n]), inputs.labels, inputs.teacher_l, out_u, inputs.teacher_u,
                         tc.temperature, tc.weighting)


def optimizer_step(student: Student, loss: torch.Tensor, tc: TrainConfig) -> float:
    """Backward, clip (train.grad_clip), step the optimiser and the schedule; returns the lr the step used."""
    student.optimizer.zero_grad(set_to_none=True)
    student.scaler.scale(loss).backward()
    if tc.grad_clip:
        student.scaler.unscale_(student.optimizer)
        torch.nn.utils.clip_grad_norm_(student.model.parameters(), tc.grad_clip)
    student.scaler.step(student.optimizer)
    student.scaler.update()
    lr = student.scheduler.get_last_lr()[0]
    student.scheduler.step()
    return lr


def finite_flag(tensors: list[torch.Tensor], runtime: Runtime) -> torch.Tensor:
    """1 where every value of `tensors` is finite here and on the other ranks, else 0, on the device (no wait)."""
    # The largest magnitude is finite exactly when every value is (amax keeps a NaN); on the CPU it is several
    # times faster than isfinite.
    largest = torch.stack([t.detach().abs().amax().float() for t in tensors if t.numel()])
    finite = largest.isfinite().all().to(torch.int32)
    if runtime.world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite


def diverged(ctx: RunContext, checkpoints: Checkpoints, step: int, rows: torch.Tensor, what: str) -> TrainingDiverged:
    """The error that stops the run at `step`: what went wrong, the shards of the batch's rows, the checkpoint kept."""
    held = set(rows.tolist())
    shards = [s.path.name for s in ctx.manifest.shards() if any(r in s.rows for r in held)]
    return TrainingDiverged(f"step {step}: {what} (a batch from {', '.join(shards)}); training stopped, "
                            f"{checkpoints.kept()}")


def save_final(ctx: RunContext, student: Student, checkpoints: Checkpoints) -> None:
    """final.pt with alpha and beta (searched on val for DHO, the CE head alone (1, 1) for one-head methods) and
    val_top1, the val top-1 of what it deploys (None without val)."""
    cfg, tc = ctx.cfg, ctx.cfg.train
    alpha, beta = (cfg.eval.default_alpha, cfg.eval.default_beta) if tc.method == "dho" else (1.0, 1.0)
    val_top1 = None
    val_shards = ctx.manifest.splits.get("val", [])
    if ctx.runtime.is_main and val_shards:
        batches = clean_batches(val_shards, student.data.image_size, cfg.eval.batch_size,
                                skip_bad=cfg.data.on_bad_image == "skip", bad_rows=ctx.val_bad_rows)
        out = head_outputs(student.model, batches, student.data, ctx.runtime.device)
        if not len(out.labels):
            warn(f"every val image of {ctx.manifest.root} was skipped as bad (data.on_bad_image: skip): final.pt "
                 f"keeps alpha {alpha} and beta {beta} unsearched")
        elif tc.method == "dho":
            alpha, beta, val_top1 = search_alpha_beta(out, cfg.eval.alpha_grid, cfg.eval.beta_grid)
        else:
            val_top1 = accuracy(out.ce, out.labels)
    checkpoints.save(student, ctx.total_steps, checkpoints.out_dir / "final.pt", alpha=alpha, beta=beta,
                     method=tc.method, val_top1=val_top1)


def stopped_at(out_dir: Path) -> str | None:
    """'76 of 200' when the run in `out_dir` stopped before its last step (last.pt, no final.pt), else None."""
    if (out_dir / "final.pt").is_file() or not (out_dir / "last.pt").is_file():
        return None
    state = load_checkpoint(out_dir / "last.pt")
    return f"{state['step']} of {state['total_steps']}"


def final_summary(out_dir: Path) -> str:
    """What a finished run deploys, for its last line: its val top-1 with alpha and beta; '' before final.pt."""
    final = out_dir / "final.pt"
    if not final.is_file():
        return ""
    state = load_checkpoint(final)
    alpha, beta, val_top1 = state["alpha"], state["beta"], state.get("val_top1")
    if state["method"] != "dho":
        return f"  (val top-1 {val_top1:.3f}, the CE head)" if val_top1 is not None else "  (no val split)"
    if val_top1 is None:
        return f"  (no val split: alpha {alpha}, beta {beta} by default)"
    return f"  (val top-1 {val_top1:.3f} at alpha {alpha}, beta {beta})"


def validate(model: torch.nn.Module, shards: list, data, device: torch.device, cfg: PipelineConfig,
             bad_rows: frozenset[int] = frozenset()) -> dict:
    """Val top-1 of the CE head, the KD head and their combination at the default alpha/beta (`bad_rows` left out)."""
    batches = clean_batches(shards, data.image_size, cfg.eval.batch_size, skip_bad=cfg.data.on_bad_image == "skip",
                            bad_rows=bad_rows)
    out = head_outputs(model, batches, data, device)
    combined = combine(out.ce, out.kd, cfg.eval.default_alpha, cfg.eval.default_beta)
    return {"ce_head": accuracy(out.ce, out.labels), "kd_head": accuracy(out.kd, out.labels),
            "combined": accuracy(combined, out.labels)}
