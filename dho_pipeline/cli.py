"""The `dho` command line: make shards, cache the teacher, train and evaluate students."""

from __future__ import annotations

import json
import os
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click

from dho_pipeline.config import DEVICE_CHOICES, ConfigError, PipelineConfig, load_config
from dho_pipeline.errors import human_bytes, warn
from dho_pipeline.locations import Location, UrlPath, is_url
from dho_pipeline.stop_request import stop_signal, terminate_as_interrupt

CONFIG_HELP = "The experiment file (see pipeline.yaml in the repository)."
SET_HELP = ("Override one config key, e.g. --set train.lr=5e-4 (repeatable). Paths are relative to the "
            "config file's folder, as in the file.")
config_option = click.option("-c", "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                             help=CONFIG_HELP)


class PathOrUrl(click.ParamType):
    """A local path (checked as click.Path checks it) or an fsspec URL such as s3://bucket/shards (checked on use)."""

    name = "path_or_url"

    def __init__(self, **path_checks):
        self.local = click.Path(path_type=Path, **path_checks)

    def convert(self, value, param, ctx) -> Location:
        if isinstance(value, (Path, UrlPath)):
            return value
        return UrlPath(value) if is_url(value) else self.local.convert(value, param, ctx)


def experiment_options(command: Callable) -> Callable:
    """-c/--config and the repeatable --set key=value of every command that reads pipeline.yaml."""
    return config_option(click.option("--set", "overrides", multiple=True, help=SET_HELP)(command))


def _config(config: Path | None, overrides: tuple[str, ...]) -> PipelineConfig:
    try:
        return load_config(config, list(overrides))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def _is_main_process() -> bool:
    """Rank 0 under torchrun, or a single process."""
    return os.environ.get("RANK", "0") == "0"


def _world_size() -> int:
    """The number of torchrun's processes (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _echo_main(message: str) -> None:
    """Print once under torchrun: from rank 0 only."""
    if _is_main_process():
        click.echo(message)


class DhoGroup(click.Group):
    """Report dho's own errors (bad config, shard, store, checkpoint, full disk) as one line, not a traceback.

    `dho --debug ...` or DHO_DEBUG=1 shows the full traceback instead.
    """

    def invoke(self, ctx: click.Context):
        from dho_pipeline.errors import is_user_error, one_line

        try:
            return super().invoke(ctx)
        except Exception as e:
            if ctx.params.get("debug") or not is_user_error(e):
                raise
            raise click.ClickException(one_line(e)) from None


@click.group(cls=DhoGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, envvar="DHO_DEBUG",
              help="Show full tracebacks instead of one-line errors (also DHO_DEBUG=1).")
@click.version_option(package_name="dho")
def main(debug: bool) -> None:
    """Distil a CLIP teacher into a small dual-head student (DHO, arXiv 2505.07675).

    \b
    The usual flow:
      dho make-shards SOURCE shards/        # images -> WebDataset shards + manifest
      dho cache-teacher -c pipeline.yaml    # teacher logits -> Zarr store (once, big GPU)
      dho train-student -c pipeline.yaml    # dual-head student from the store (many times)
      dho evaluate runs/x/final.pt          # alpha/beta search on val, test accuracy
      dho export runs/x/final.pt --format onnx --out x.onnx   # serve it without dho
      dho plot runs/x runs/y --out curves.png                  # loss and val curves side by side
    """


def _refuse_with(mode: str, **given: object) -> None:
    """A usage error naming the options given (not None, 0 or False) that `mode` does not take."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value not in (None, 0, False)]
    if named:
        raise click.UsageError(f"{mode} does not take {', '.join(named)}")


existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@main.command("make-shards")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=PathOrUrl(file_okay=False))
@click.option("--shots", type=click.IntRange(min=1), help="Labelled images per class (few-shot).")
@click.option("--percent", type=click.FloatRange(0, 100, min_open=True), help="Labelled percent, per class.")
@click.option("--val-per-class", type=click.IntRange(min=0), default=0, show_default=True,
              help="Validation images per class, taken from the training images.")
@click.option("--test-per-class", type=click.IntRange(min=0), default=None,
              help="Without a test part in SOURCE: test images per class carved from training images. "
                   "With one: keep at most this many test images per class.")
@click.option("--max-train-per-class", type=click.IntRange(min=1), default=None,
              help="Use at most this many training images per class for labelled + unlabelled, and "
                   "--val-per-class more for val (small experiments).")
@click.option("--split-file", type=existing_file,
              help="A CoOp / Tip-Adapter split JSON over the images under SOURCE: its train, val and test, "
                   "--shots K per class drawn from train as they draw them (the rest unlabelled), min(K, 4) from val.")
@click.option("--split-rule", type=click.Choice(["coop", "tip-adapter"]), default="coop", show_default=True,
              help="With --split-file: draw train then val (CoOp, seed = --seed) or val then train (Tip-Adapter "
                   "and the DHO reference, which use --seed 1).")
@click.option("--labelled-list", type=existing_file,
              help="An ImageNet 1%/10% list (one image file name a line, e.g. n01440764_10026.JPEG): those "
                   "training images are labelled, every other one unlabelled.")
@click.option("--test-only", is_flag=True,
              help="Write test shards only, from class folders that map onto the classes of --train-shards.")
@click.option("--train-shards", type=PathOrUrl(exists=True, file_okay=False),
              help="With --test-only: the training shards whose classes (and class indices) the set uses.")
@click.option("--class-map", type=existing_file,
              help="With --test-only: the training class of each folder, as JSON {\"folder\": \"class\"} or "
                   "text lines 'folder class name'. Without it folder names must be training class names.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per shard; also the row chunk of the teacher store.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the split.")
def make_shards(source: Path, out: Location, shots: int | None, percent: float | None, val_per_class: int,
                test_per_class: int | None, max_train_per_class: int | None, split_file: Path | None,
                split_rule: str, labelled_list: Path | None, test_only: bool, train_shards: Location | None,
                class_map: Path | None, shard_size: int, seed: int) -> None:
    """Write labelled / unlabelled / val / test WebDataset shards from SOURCE into OUT.

    SOURCE is an ImageFolder tree (one folder per class, optionally under train/ and test/) or a
    Fashion-MNIST idx directory. Give --shots or --percent; every other training image goes to the
    unlabelled split (its label is kept for reporting only). OUT/manifest.json lists the classes,
    the shards with their sizes and sha256, and the counts per split. OUT may be an object-store URL
    (s3://bucket/shards, gs://...): the shards are written locally first, then uploaded, the manifest last.
    Stopped part-way (Ctrl-C, SIGTERM, a kill, an error), it keeps the shards it finished, listed in
    OUT/make-shards-progress.json: the same command writes only the rest.

    \b
    Examples:
      dho make-shards ~/data/flowers shards/flowers-16 --shots 16 --val-per-class 4
      dho make-shards data/oxford_pets/images shards/pets-16 --split-file split_zhou_OxfordPets.json --shots 16
      dho make-shards ~/imagenet shards/in-1pct --labelled-list 1percent.txt --val-per-class 5
      dho make-shards ~/imagenet-r shards/in-r --test-only --train-shards shards/in-1pct [--class-map map.txt]

    \b
    --split-file: the split JSON of CoOp / Tip-Adapter ({"train": [[path, label, class name], ...],
    "val": [...], "test": [...]}, paths under SOURCE); class names come from the file.
    --labelled-list: SOURCE is an ImageFolder; --val-per-class and --test-per-class carve val (and test,
    without a test/ part) from the images the list leaves out.
    --test-only: SOURCE holds one folder per class, each a training class of --train-shards or mapped onto
    one by --class-map; the manifest records the classes the set covers, and `dho evaluate --shards
    NAME=OUT` scores it with the heads restricted to them.
    """
    from dho_pipeline.data.shards import load_manifest, write_shards

    plain = {"shots": shots, "percent": percent, "val_per_class": val_per_class, "test_per_class": test_per_class,
             "max_train_per_class": max_train_per_class}
    modes = [m for m, on in (("--split-file", split_file), ("--labelled-list", labelled_list),
                             ("--test-only", test_only)) if on]
    if len(modes) > 1:
        raise click.UsageError(f"give at most one of {', '.join(modes)}")
    if not test_only:
        _refuse_with("without --test-only, make-shards", train_shards=train_shards, class_map=class_map)
    # every argument, so the manifest says how its shards were made (paths as strings)
    info = {name: str(value) if isinstance(value, (Path, UrlPath)) else value
            for name, value in click.get_current_context().params.items()}
    if split_file:
        from dho_pipeline.data.sources import FileSource
        from dho_pipeline.data.split_files import fewshot_splits, read_split_file

        _refuse_with("--split-file", **{**plain, "shots": None})
        if shots is None:
            raise click.UsageError("--split-file needs --shots K (labelled images per class drawn from its train)")
        class_names, parts = read_split_file(split_file, source)
        src = FileSource(class_names)
        splits = fewshot_splits(parts, class_names, shots, seed, split_rule)
    elif labelled_list:
        from dho_pipeline.data.sources import ImageFolderSource
        from dho_pipeline.data.split_files import labelled_list_splits

        _refuse_with("--labelled-list", shots=shots, percent=percent, max_train_per_class=max_train_per_class)
        src = ImageFolderSource(source)
        splits = labelled_list_splits(src, labelled_list, val_per_class=val_per_class,
                                      test_per_class=test_per_class, seed=seed)
    elif test_only:
        from dho_pipeline.data.ood_sets import ood_splits

        _refuse_with("--test-only", **plain)
        if train_shards is None:
            raise click.UsageError("--test-only needs --train-shards DIR: the shards whose classes the set maps onto")
        src, splits, covers = ood_splits(source, load_manifest(train_shards), class_map)
        info["covers"] = covers
    else:
        from dho_pipeline.data.sources import open_source
        from dho_pipeline.data.splits import split_source

        if (shots is None) == (percent is None):
            raise click.UsageError("give exactly one of --shots or --percent")
        src = open_source(source)
        splits = split_source(src, shots=shots, percent=percent, val_per_class=val_per_class,
                              test_per_class=test_per_class, max_train_per_class=max_train_per_class, seed=seed)
    try:
        with terminate_as_interrupt():
            manifest = write_shards(src, splits, out, shard_size=shard_size, info=info)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM: the shards finished are listed in the progress file
        _exit_interrupted(stop, "make-shards", f"{out} keeps every finished shard: the same command continues")
    counts = ", ".join(f"{s} {manifest.split_count(s)}" for s in manifest.splits)
    click.echo(f"wrote {len(manifest.shards())} shards to {out} ({counts})")
    if not test_only and not manifest.split_count("val"):
        remedy = "give a split file with val entries" if split_file else "add --val-per-class N"
        warn(f"no val split: train-student's DHO keeps the default alpha/beta (eval.default_alpha, "
             f"eval.default_beta) instead of searching them on val, and logs no val accuracy; {remedy}")
    if not test_only and not manifest.split_count("test"):
        remedy = "give a split file with test entries" if split_file else (
            "add --test-per-class N (carved from the training images when SOURCE has no test part)")
        warn(f"no test split: dho evaluate will have no test images to score; {remedy}")


@main.command("cache-teacher")
@experiment_options
@click.option("--overwrite", is_flag=True, help="Replace a store at the same path made with other settings.")
@click.option("--max-shards", type=click.IntRange(min=1), default=None,
              help="Process at most this many shards, then stop; a later run goes on from there.")
def cache_teacher(config: Path | None, overrides: tuple[str, ...], overwrite: bool, max_shards: int | None) -> None:
    """Run the teacher over every shard once and write its logits to the Zarr store.

    For each image: the clean view plus views.count random views (val/test: the clean view only),
    each with its crop box and flip bit. Resumable: rerun the same command after a crash or kill and
    only unfinished shards are computed. A store whose settings differ is refused unless --overwrite.
    Runs under torchrun (ranks split the shards).

    Speed on a GPU: the tower runs in teacher.dtype (bf16 by default there) while data.num_workers CPU
    workers decode and crop the views; give them the node's cores. For a teacher faster than they can
    crop for (likely a ViT-B-16 on an H100), --set teacher.render=device leaves the crops to the GPU.
    """
    from stages import cache_teacher as stage

    cfg = _config(config, overrides)
    try:
        with terminate_as_interrupt(_world_size()):  # from the start: a SIGTERM while the lock is held releases it
            report = stage.run(cfg, overwrite=overwrite, max_shards=max_shards)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM: every finished shard is in the store, checked when read
        _exit_interrupted(stop, "cache-teacher", "the store keeps every finished shard: continue with "
                          f"{_command_line('cache-teacher', config, overrides)}", quiet=not _is_main_process())
    _echo_main(report.summary())
    _echo_main(f"store: {report.path}")


@main.command("fit-adapter")
@experiment_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Adapter file to write (default: teacher.adapter.file, else one under cache.root/adapters).")
def fit_adapter(config: Path | None, overrides: tuple[str, ...], out: Path | None) -> None:
    """Fit the Tip-Adapter(-F) teacher (teacher.kind) on the labelled shards and save it.

    Keys: teacher features of the labelled images averaged over teacher.adapter.augment_epochs augmented
    views; values: their one-hot labels; a and b searched on val. Tip-Adapter-F also trains the keys.
    `dho cache-teacher` fits it by itself when needed, or takes the file via teacher.adapter.file.
    """
    from dho_pipeline.data.shards import load_manifest
    from dho_pipeline.data.teacher_views import warn_if_rendering_on_cpu
    from dho_pipeline.runtime import pick_device
    from dho_pipeline.teacher.open_clip_teacher import load_teacher
    from dho_pipeline.teacher.tip_adapter import adapter_path, fit_and_save

    cfg = _config(config, overrides)
    if cfg.teacher.kind == "zero-shot":
        raise click.UsageError("teacher.kind is zero-shot: set it to tip-adapter or tip-adapter-f")
    manifest = load_manifest(cfg.location(cfg.data.shards))
    device = pick_device(cfg.train.device, "train.device")
    warn_if_rendering_on_cpu(cfg.teacher.render, device, cfg.data.num_workers)
    teacher = load_teacher(cfg.teacher, manifest.class_names, device, cfg.base_dir)
    path = out or adapter_path(cfg, teacher.fingerprint, manifest)
    sha, report = fit_and_save(teacher, cfg, manifest, path, device, log=click.echo)
    click.echo(json.dumps({"file": str(path), "sha256": sha, **report}, indent=1))


@main.group("cache")
def cache() -> None:
    """Look after teacher stores: list them, inspect one, verify (and repair) one, copy one elsewhere."""


@cache.command("inspect")
@click.argument("store", type=PathOrUrl(exists=True, file_okay=False))
@click.option("--shards", type=PathOrUrl(exists=True, file_okay=False),
              help="The shard set (make-shards' output folder) STORE was made from: bad images are then named by "
                   "their source files too (from its sources.json).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_inspect(store: Location, shards: Location | None, as_json: bool) -> None:
    """Size, progress, fingerprint and teacher accuracy of STORE (a folder or a URL such as s3://bucket/x.zarr)."""
    from dho_pipeline.data.shards import load_manifest
    from dho_pipeline.store.report import summarize

    s = summarize(store, progress=not as_json, manifest=load_manifest(shards) if shards else None)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    click.echo(f"store        {s['path']}")
    click.echo(f"teacher      {s['teacher']}")
    click.echo(f"rows         {s['rows']} " + " ".join(f"{k}={v}" for k, v in s["split_rows"].items()))
    click.echo(f"views        {s['views']} (1 clean + {s['views'] - 1} random)   classes {s['classes']}")
    click.echo(f"dtype        {s['dtype']}   on disk {human_bytes(s['bytes_on_disk'])}"
               f"   per view {s['bytes_per_view']:.1f} B")
    click.echo(f"done         {s['done_fraction']:.1%}   bad images skipped {s['bad_rows']}")
    for bad in s["bad_images"]:
        source = f"  from {bad['source']}" if "source" in bad else ""
        click.echo(f"bad image    {bad['shard']} sample {bad['key']!r}{source}")
    if s["bad_images_not_listed"]:
        click.echo(f"             and {s['bad_images_not_listed']} more")
    for name, problem in s["damaged_shards"].items():
        click.echo(f"DAMAGED      {name}: {problem}")
    if s["damaged_shards"]:
        click.echo(f"             rerun `dho cache-teacher` with its config, or `dho cache verify "
                   f"{shlex.quote(str(store))} --repair -c CONFIG`, to recompute them")
    click.echo(f"fingerprint  {s['fingerprint']}")
    for split, acc in s["teacher_accuracy"].items():
        views = s["teacher_view_accuracy"][split]
        clean = "-" if acc is None else f"{acc:.4f}"
        on_views = "" if views is None else f"   random views {views:.4f}"
        zero_shot = s["teacher_zero_shot_accuracy"][split]
        adapted = "" if zero_shot is None else f"   (zero-shot head {zero_shot:.4f})"
        click.echo(f"teacher top-1 {split:<10} clean {clean}{on_views}{adapted}")


@cache.command("verify")
@click.argument("store", type=PathOrUrl(exists=True, file_okay=False))
@click.option("--repair", is_flag=True, help="Recompute damaged and unfinished shards with the teacher (needs -c).")
@experiment_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_verify(store: Location, repair: bool, config: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check every shard of STORE against the checksums written with it.

    A shard is damaged when one of its chunks is missing, truncated, overwritten or unreadable. Exit
    status 0 when every shard is computed and intact, 1 otherwise. --repair -c pipeline.yaml runs the
    teacher on the damaged and unfinished shards (as `dho cache-teacher` with that config would), then
    checks again. The config must describe the store (same teacher, views and shards).
    """
    from dho_pipeline.store.report import verify
    from dho_pipeline.store.zarr_store import StoreMismatch, TeacherStore

    if repair:
        if config is None:
            raise click.UsageError("--repair recomputes shards with the teacher: give the store's config with -c")
        from stages import cache_teacher

        where = store if isinstance(store, UrlPath) else store.resolve()
        try:
            cache_teacher.run(_config(config, (*overrides, f"cache.store={where}")))
        except StoreMismatch as e:  # not cache-teacher's advice: --overwrite would throw the store's shards away
            raise StoreMismatch.of(e.path, e.fields, "--repair recomputes shards as the store made them: give the "
                                   "config it was made with (each field named at the store's value, e.g. with "
                                   "--set)") from None
    report = verify(TeacherStore.open(store), progress=not as_json)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(f"{store}: {report['shards']} shards: {len(report['intact'])} intact, "
                   f"{len(report['damaged'])} damaged, {len(report['not_computed'])} not computed yet")
        for name, problem in report["damaged"].items():
            click.echo(f"  DAMAGED {name}: {problem}")
        if report["damaged"] or report["not_computed"]:
            click.echo(f"  to recompute them: dho cache verify {shlex.quote(str(store))} --repair -c CONFIG")
    if report["damaged"] or report["not_computed"]:
        raise SystemExit(1)


@cache.command("copy")
@click.argument("source", type=PathOrUrl(exists=True, file_okay=False))
@click.argument("destination", type=PathOrUrl(file_okay=False))
def cache_copy(source: Location, destination: Location) -> None:
    """Copy the store SOURCE to DESTINATION: local folders and object-store URLs, either way.

    \b
      dho cache copy cache/ViT-L-14-3f07ca3dcc57.zarr s3://team-bucket/cache/ViT-L-14-3f07ca3dcc57.zarr
      dho cache copy s3://team-bucket/cache/ViT-L-14-3f07ca3dcc57.zarr /scratch/cache/vit-l.zarr

    Only shards the source has finished are copied, each verified against its checksums as it is read; a
    source that cache-teacher is still filling is copied as it was when the copy began (copy again later).
    Resumable: after a kill, the same command copies what is missing. At the end the destination must have
    the source's fingerprint and done mask, and every shard must verify. Credentials come from the
    environment (AWS_* variables, ~/.aws, gcloud), as fsspec reads them.
    """
    from dho_pipeline.store.copy import copy_store

    try:
        with terminate_as_interrupt():
            click.echo(copy_store(source, destination).summary())
    except KeyboardInterrupt as stop:  # the shards in flight are finished and checked; the next call skips them
        _exit_interrupted(stop, "cache copy", f"{destination} keeps every shard copied: continue with "
                          f"{shlex.join(['dho', 'cache', 'copy', str(source), str(destination)])}")


@cache.command("list")
@config_option
@click.option("--root", type=PathOrUrl(file_okay=False),
              help="Folder or URL of stores (default: cache.root).")
def cache_list(config: Path | None, root: Location | None) -> None:
    """The stores under cache.root (or --root, e.g. s3://bucket/cache) with teacher, classes, views, rows,
    done fraction and size.

    Fast: it reads each store's done marks and lists its files, so a shard with a chunk file missing shows
    as damaged; it does not read the chunks. `dho cache verify STORE` checks every chunk against its checksum.
    """
    from dho_pipeline.store.report import list_stores

    if root is None:
        cfg = _config(config, ())
        root = cfg.location(cfg.cache.root)
    stores = list_stores(root)
    if not stores:
        click.echo(f"no stores under {root}")
    for s in stores:
        if "error" in s:
            click.echo(f"{s['path']}  unreadable: {s['error']}")
            continue
        damaged = len(s["damaged_shards"])
        verify = shlex.join(["dho", "cache", "verify", s["path"]])
        flag = f"  DAMAGED: {damaged} shard{'s' if damaged > 1 else ''}, run `{verify}`" if damaged else ""
        logits = f"top-k={s['top_k']}" if s["top_k"] else "logits=all"
        click.echo(f"{s['path']}  {s['teacher']}  classes={s['classes']} {logits} views={s['views']} rows={s['rows']} "
                   f"done={s['done_fraction']:.0%} size={human_bytes(s['bytes_on_disk'])}{flag}")


@main.command("train-student")
@experiment_options
@click.option("--resume", is_flag=True,
              help="Continue the run in train.out_dir from its last.pt (refused when there is no run to continue).")
@click.option("--overwrite", is_flag=True,
              help="Start over in a train.out_dir that holds a run: remove its checkpoints, metrics and events first.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many more steps (counted from the step a --resume starts at), with a "
                   "checkpoint; continue later with --resume.")
def train_student(config: Path | None, overrides: tuple[str, ...], resume: bool, overwrite: bool,
                  max_steps: int | None) -> None:
    """Train the dual-head student from the cached teacher logits.

    \b
    train.method: dho (CE head + KD head), single_head_kd or ce_only, on the same data and store.
    teacher.mode: cached (default; the teacher never runs) or online (the teacher runs every step,
    for comparison). Writes train.out_dir/{metrics.jsonl,last.pt,final.pt}; final.pt holds alpha and
    beta searched on val. A train.out_dir that holds a run is refused unless --resume continues it or
    --overwrite replaces it. Runs under torchrun (DDP).
    """
    from stages import train_student as stage

    if resume and overwrite:
        raise click.UsageError("--resume continues the run in train.out_dir, --overwrite replaces it: give one")
    try:
        out = stage.run(_config(config, overrides), resume=resume, overwrite=overwrite, max_steps=max_steps)
    except stage.TrainingStopped as stopped:  # Ctrl-C or SIGTERM: not a failure, but the run is not done
        _exit_stopped(f"{stopped}; continue with {_command_line('train-student', config, overrides, '--resume')}",
                      stopped.signal_number)
    if _is_main_process():  # rank 0 alone reads the checkpoints
        stopped_at = stage.stopped_at(out)
        if stopped_at:
            click.echo(f"run: {out}  (stopped at step {stopped_at} by --max-steps; continue with "
                       f"{_command_line('train-student', config, overrides, '--resume')})")
        else:
            click.echo(f"run: {out}{stage.final_summary(out)}")


def _exit_stopped(message: str, signal_number: int, quiet: bool = False) -> NoReturn:
    """End a job stopped by a signal, not a failure (what it finished is kept): `message`, saying what was kept
    and the command that continues it, on stderr, and the shell's exit status for the signal (130: Ctrl-C)."""
    if not quiet:
        click.echo(message, err=True)
    raise SystemExit(128 + signal_number)


def _exit_interrupted(stop: KeyboardInterrupt, job: str, kept_and_next: str, quiet: bool = False) -> NoReturn:
    """End a job that Ctrl-C or SIGTERM (stop_request.Terminated) stopped: "JOB stopped (Ctrl-C); KEPT_AND_NEXT"."""
    number = stop_signal(stop)
    name = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
    _exit_stopped(f"{job} stopped ({name}); {kept_and_next}", number, quiet)


def _command_line(command: str, config: Path | None, overrides: tuple[str, ...], *extra: str) -> str:
    """The dho `command` of `config` with `overrides` and `extra`, to continue a stopped job: under torchrun, the
    same launch (a resumed run needs as many processes as its last.pt holds rank states)."""
    args = [command, *(["-c", str(config)] if config else []),
            *(arg for override in overrides for arg in ("--set", override)), *extra]
    world_size = _world_size()
    if world_size == 1:
        return shlex.join(["dho", *args])
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size:  # one node
        return shlex.join(["torchrun", "--nproc_per_node", str(world_size), "-m", "dho_pipeline.cli", *args])
    return f"the same torchrun launch ({world_size} processes) of dho_pipeline.cli {shlex.join(args)}"


@main.command("evaluate")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--shards", "extra", multiple=True, metavar="NAME=DIR|PATTERN",
              help="An extra test set (repeatable): a folder of make-shards, e.g. --shards sketch=shards/sketch "
                   "(its test split; a --test-only set is scored over its classes only), or tar files, e.g. "
                   "--shards sketch='ood/sketch-*.tar' (every class).")
@click.option("--run-shards", type=PathOrUrl(file_okay=False), default=None, metavar="DIR",
              help="The run's own shards, where they are now if they moved since training (final.pt records where "
                   "they were); they must hold the same images.")
@click.option("--device", default="auto", show_default=True, help=f"Where the student runs: {DEVICE_CHOICES}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(checkpoint: Path, extra: tuple[str, ...], run_shards: Location | None, device: str,
             as_json: bool) -> None:
    """Search alpha/beta on val and report test top-1 of each head, both combinations and the teacher.

    The combination is p = alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta); alpha in 0..1 by 0.05
    and beta in {0.5, 0.75, 1, 1.25, 1.5, 2, 4} by default (the eval section of the run's config, as final.pt
    recorded it).

    \b
    A set made with `make-shards --test-only` (ImageNet-R, -A, -Sketch, -V2, ...) covers some of the
    training classes: its top-1 is over those classes, each head's logits of the others masked out
    before the softmax and the argmax, for the heads and both combinations alike.
      dho evaluate runs/in-1pct/final.pt --shards in-r=shards/in-r --shards sketch=shards/in-sketch
    """
    from stages import evaluate as stage

    sets = {}
    for item in extra:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise click.UsageError(f"--shards {item!r}: expected NAME=DIR or NAME=PATTERN")
        sets[name] = pattern
    result = stage.run(checkpoint, sets, device, run_shards)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(f"alpha {result['alpha']:.2f}  beta {result['beta']:.2f}  (searched on val)")

    def row(name: str, r: dict, teacher: float | None = None) -> str:
        t = "" if teacher is None else f"  teacher {teacher:.4f}"
        return (f"{name:<10} ce_head {r['ce_head']:.4f}  kd_head {r['kd_head']:.4f}  combined default "
                f"{r['combined_default']:.4f}  searched {r['combined_searched']:.4f}{t}  ({r['images']} images"
                + (f", {r['classes']} classes)" if "classes" in r else ")"))

    click.echo(row("test", result, result["teacher"]))
    for name, r in result["extra"].items():
        click.echo(row(name, r))


@main.command("predict")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many classes to print for each image, the most probable first.")
@click.option("--device", default="auto", show_default=True, help=f"Where the student runs: {DEVICE_CHOICES}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: image -> [[class, prob], ...].")
def predict(checkpoint: Path, images: tuple[Path, ...], top_k: int, device: str, as_json: bool) -> None:
    """Classify IMAGES with a trained student (both heads combined with its stored alpha/beta)."""
    from dho_pipeline.student.predict import predict_files

    result = predict_files(checkpoint, list(images), top_k, device)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    for image, top in result.items():
        click.echo(f"{image}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))


@main.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "safetensors"]), required=True,
              help="onnx and torchscript: one model, images to probabilities; safetensors: timm weights and heads.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write; its description goes beside it as OUT.json (model.onnx -> model.onnx.json).")
@click.option("--head", type=click.Choice(["combined", "ce", "kd"]), default="combined", show_default=True,
              help="onnx/torchscript: the searched alpha/beta combination of both heads, or one head's softmax.")
def export(checkpoint: Path, fmt: str, out: Path, head: str) -> None:
    """Export the student of a final.pt for serving, with its preprocessing written beside it.

    \b
      dho export runs/fmnist-dho/final.pt --format onnx --out fmnist-dho.onnx
      dho export runs/fmnist-dho/final.pt --format torchscript --out fmnist-dho.ts --head kd
      dho export runs/fmnist-dho/final.pt --format safetensors --out fmnist-dho.safetensors

    \b
    onnx, torchscript: input `images`, float32 (batch, 3, S, S), normalised; output `probabilities`
    (batch, classes): p = alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta) with the run's alpha and
    beta, or --head ce / kd alone. Checked against the student before the command returns. ONNX needs the
    export extra (pip install -e '.[export]'); open_clip students export too.
    safetensors (timm students): the backbone under timm's names and the heads as ce_head.*, kd_head.*:
    timm.create_model(MODEL, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=OUT)).
    OUT.json holds image size, mean, std (also as a timm data config), class names, method, alpha, beta
    and the model name; the file itself holds the same in its metadata.
    """
    from dho_pipeline.student.export import description_path, export_student

    described = export_student(checkpoint, fmt, out, head)
    if fmt == "safetensors":
        what = "backbone and both heads"
    elif head != "combined":
        what = f"{head} head"
    elif described["method"] != "dho":
        what = f"CE head, the one a {described['method']} run trains"
    else:
        what = f"alpha {described['alpha']:.2f}, beta {described['beta']:.2f}"
    click.echo(f"wrote {out} ({fmt}, {described['model']}, {what}) and {description_path(out)}")


@main.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The image to write: .png, .pdf, .svg, ...")
def plot(runs: tuple[Path, ...], out: Path) -> None:
    """Draw the training loss and val top-1 curves of RUNS (train.out_dir folders) side by side.

    \b
      dho plot runs/fmnist-dho runs/kd runs/ce --out curves.png
      dho plot runs/dho-seed0 runs/dho-seed1 --out seeds.pdf

    Four panels against the step: the training loss, and val top-1 of the CE head, the KD head and their
    combination at eval.default_alpha/beta (logged once an epoch). One line per run, labelled by its method
    and seed (read from its final.pt, or last.pt while it runs). One-head runs (single_head_kd, ce_only)
    appear in the loss and CE-head panels only: their KD head is never trained.
    """
    from dho_pipeline.run_plots import plot_runs

    plot_runs(list(runs), out)
    click.echo(f"wrote {out}")


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where shards, stores, runs and results go (the teacher is reused).")
@click.option("--quick", is_flag=True, help="One setting, fewer steps: a few minutes on 2 CPU cores.")
@click.option("--retrain", is_flag=True,
              help="Train (and time) every run from the start, instead of continuing or keeping an earlier call's.")
def demo(out: Path, quick: bool, retrain: bool) -> None:
    """Run the whole pipeline on Fashion-MNIST offline and print an accuracy table.

    Pretrains tiny CLIP teachers on half of the training images, then for each setting (a label budget and
    a teacher) makes shards, caches the teacher and trains its students: CE-only, single-head KD, DHO
    (cached) and DHO (online teacher), or the subset the plan gives the setting (stages/demo.py). --quick
    runs one 4-shot setting with all four. Writes OUT/results.json, OUT/results.md and OUT/results.png.

    A stopped demo continues where it stopped when called again with the same OUT: the teacher, shards,
    stores and finished runs are reused, and a stopped run goes on from its last checkpoint.
    """
    from stages import demo as stage
    from stages.train_student import TrainingStopped

    again = shlex.join(["dho", "demo", "--out", str(out), *(["--quick"] if quick else [])])
    try:
        with terminate_as_interrupt():
            results = stage.run(out, stage.QUICK if quick else stage.FULL, log=click.echo, retrain=retrain)
    except TrainingStopped as stopped:  # Ctrl-C or SIGTERM during a run: the next call goes on from its last.pt
        _exit_stopped(f"{stopped}; continue with {again}", stopped.signal_number)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM between runs: what is finished is kept
        _exit_interrupted(stop, "demo", f"continue with {again}")
    click.echo(stage.results_table(results))
    click.echo(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")


if __name__ == "__main__":
    main()
