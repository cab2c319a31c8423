"""Stage two: train the dual-head student from the cached teacher logits (or, for comparison, online).

Each step takes B_l labelled and B_u unlabelled samples, each with one of its cached views replayed at
the student's resolution and the teacher's logits for that view read from the store. The teacher runs
only in the online mode (teacher.mode: online), which shares every other line of this recipe.
Checkpoints hold model, optimiser, scheduler, step and RNG states; the loaders resume by arithmetic
from the step, so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dho_pipeline.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dho_pipeline.config import PipelineConfig
from dho_pipeline.evaluation import accuracy, combine, head_outputs, search_alpha_beta
from dho_pipeline.losses import training_loss
from dho_pipeline.runtime import autocast, init_runtime
from dho_pipeline.schedule import make_scheduler
from dho_pipeline.shards import load_manifest
from dho_pipeline.store_lookup import find_store, view_recipe
from dho_pipeline.student import build_student
from dho_pipeline.student_stream import StreamSpec, StudentStream, clean_batches
from dho_pipeline.teacher import load_teacher
from dho_pipeline.templates import resolve_templates
from dho_pipeline.tip_adapter import attach_adapter
from dho_pipeline.views import normalize


def run(cfg: PipelineConfig, resume: bool = False, max_steps: int | None = None) -> Path:
    """Train (or continue training) the student of `cfg`; returns the run folder. `max_steps` stops early."""
    runtime = init_runtime(cfg.train.device)
    device, tc = runtime.device, cfg.train
    out_dir = cfg.path(tc.out_dir)
    manifest = load_manifest(cfg.path(cfg.data.shards))
    online = cfg.teacher.mode == "online"
    fresh = online and cfg.teacher.online_views == "fresh"
    store = None if fresh else find_store(cfg, manifest)
    teacher = load_teacher(cfg.teacher, manifest.class_names, device, cfg.base_dir) if online else None
    if online:
        attach_adapter(teacher, cfg, manifest, runtime)

    torch.manual_seed(tc.seed)
    templates = resolve_templates(cfg.teacher.templates, cfg.teacher.extra_templates)
    model, data = build_student(cfg.student, manifest.class_names, templates, cfg.base_dir)
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    uses_unlabelled = tc.method != "ce_only"
    # An epoch is a pass over the unlabelled split for every method, so CE-only gets the same step budget
    # (and validation cadence) as the distilled students; without unlabelled images, over the labelled split.
    split, batch_size = ("unlabelled", tc.batch_unlabelled) if manifest.split_count("unlabelled") else (
        "labelled", tc.batch_labelled)
    steps_per_epoch = math.ceil(manifest.split_count(split) / (batch_size * runtime.world_size))
    total_steps = tc.steps or math.ceil(tc.epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, total_steps, tc.warmup, tc.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")

    start_step = 0
    last = out_dir / "last.pt"
    if resume and last.exists():
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][runtime.rank])
        start_step = state["step"]
    metrics = MetricsLog(out_dir / "metrics.jsonl", start_step, runtime.is_main)

    spec = StreamSpec(
        student_size=data.image_size, seed=tc.seed, cached_logits=not online,
        teacher_size=teacher.image_size if online else None,
        fresh_views=view_recipe(cfg) if fresh else None, skip_bad=cfg.data.on_bad_image == "skip",
    )
    store_path = str(store.path) if store else None

    def loader(split_name: str, size: int) -> DataLoader:
        stream = StudentStream(manifest.splits[split_name], store_path, spec, size, runtime.rank,
                               runtime.world_size, start_batch=start_step)
        return DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                          pin_memory=device.type == "cuda", persistent_workers=False)

    labelled = iter(loader("labelled", tc.batch_labelled))
    unlabelled = iter(loader("unlabelled", tc.batch_unlabelled)) if uses_unlabelled else None
    net = DistributedDataParallel(model) if runtime.world_size > 1 else model
    net = torch.compile(net) if tc.compile else net
    net.train()

    def inputs(batch: dict) -> torch.Tensor:
        x = normalize(batch["images"].to(device, non_blocking=True), data.mean, data.std)
        return x.contiguous(memory_format=torch.channels_last) if tc.channels_last else x

    def teacher_logits(batch: dict) -> torch.Tensor:
        if online:
            images = batch["teacher_images"].to(device, non_blocking=True)
            with autocast(device, tc.amp):
                return teacher.logits(normalize(images, teacher.mean, teacher.std)).float()
        return batch["teacher_logits"].to(device, non_blocking=True)

    def save(path: Path, step: int, **extra) -> None:
        states = [None] * runtime.world_size
        if runtime.world_size > 1:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if runtime.is_main:
            save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "rng": states, "config": cfg.to_dict(), "class_names": manifest.class_names,
                "student_data": data.__dict__, "store": store_path, "shards": str(manifest.root), **extra,
            })

    val_shards = manifest.splits.get("val", [])
    stop = total_steps if max_steps is None else min(total_steps, start_step + max_steps)
    tick, seen = time.perf_counter(), 0
    for step in tqdm(range(start_step, stop), desc="train-student", initial=start_step, total=total_steps,
                     disable=not runtime.is_main):
        batch_l = next(labelled)
        x, labels = inputs(batch_l), batch_l["label"].to(device)
        t_l = teacher_logits(batch_l) if uses_unlabelled else None
        if uses_unlabelled:
            batch_u = next(unlabelled)
            x = torch.cat([x, inputs(batch_u)])
            t_u = teacher_logits(batch_u)
        with autocast(device, tc.amp):
            ce, kd = net(x)
        n = len(labels)
        out_u = (ce[n:], kd[n:]) if uses_unlabelled else None
        loss, parts = training_loss(tc.method, (ce[:n], kd[:n]), labels, t_l, out_u, t_u if uses_unlabelled
                                    else None, tc.temperature, tc.weighting)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seen += len(x)
        done = step + 1
        if done % tc.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - tick
            metrics.write({"step": done, "epoch": done / steps_per_epoch, "loss": loss.item(), **parts, "lr": lr,
                           "images_per_s": seen * runtime.world_size / max(elapsed, 1e-9)})
            tick, seen = time.perf_counter(), 0
        if runtime.is_main and val_shards and (done % steps_per_epoch == 0 or done == total_steps):
            metrics.write({"step": done, "epoch": done / steps_per_epoch,
                           "val": validate(model, val_shards, data, device, cfg)})
        if done % tc.checkpoint_every == 0 or done == stop:
            save(last, done)
    if stop == total_steps:
        alpha, beta = cfg.eval.default_alpha, cfg.eval.default_beta
        if runtime.is_main and val_shards and tc.method == "dho":
            out = head_outputs(model, clean_batches(val_shards, data.image_size, cfg.eval.batch_size), data, device)
            alpha, beta, _ = search_alpha_beta(out, cfg.eval.alpha_grid, cfg.eval.beta_grid)
        if tc.method != "dho":
            alpha, beta = 1.0, 1.0  # one trained head: the CE head
        save(out_dir / "final.pt", total_steps, alpha=alpha, beta=beta, method=tc.method)
    runtime.barrier()
    return out_dir


def validate(model: torch.nn.Module, shards: list, data, device: torch.device, cfg: PipelineConfig) -> dict:
    """Val top-1 of the CE head, the KD head and their combination at the default alpha/beta."""
    out = head_outputs(model, clean_batches(shards, data.image_size, cfg.eval.batch_size), data, device)
    combined = combine(out.ce, out.kd, cfg.eval.default_alpha, cfg.eval.default_beta)
    return {"ce_head": accuracy(out.ce, out.labels), "kd_head": accuracy(out.kd, out.labels),
            "combined": accuracy(combined, out.labels)}


class MetricsLog:
    """metrics.jsonl, one JSON object a line; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
