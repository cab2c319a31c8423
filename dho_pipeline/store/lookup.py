"""Find the teacher store of an experiment: by its fingerprint in stage one, by what stage two can check,
and a finished one by the config that asked for it (before stage one builds the teacher)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import open_clip
import torch

from dho_pipeline.config import PipelineConfig
from dho_pipeline.data.shards import Manifest, sha256_file
from dho_pipeline.data.views import ViewRecipe
from dho_pipeline.errors import one_line, warn
from dho_pipeline.locations import Location, UrlPath
from dho_pipeline.store.lock import store_write_lock
from dho_pipeline.store.zarr_store import (
    StoreError,
    StoreMismatch,
    TeacherStore,
    build_fingerprint,
    default_store_path,
    described_diff,
    fingerprint_diff,
    stores_under,
)
from dho_pipeline.teacher.open_clip_teacher import register_model_configs, resolve_pretrained, teacher_dtype
from dho_pipeline.teacher.templates import resolve_templates


def view_recipe(cfg: PipelineConfig) -> ViewRecipe:
    v = cfg.views
    return ViewRecipe(v.count, tuple(v.scale), tuple(v.ratio), v.flip, v.seed)


def store_path(cfg: PipelineConfig, fingerprint: dict) -> Location:
    """cache.store when set, else a name derived from the fingerprint under cache.root."""
    if cfg.cache.store:
        return cfg.location(cfg.cache.store)
    return default_store_path(cfg.location(cfg.cache.root), fingerprint)


def expected_without_weights(cfg: PipelineConfig, manifest: Manifest) -> dict:
    """The fingerprint fields stage two can know without loading the teacher.

    The checkpoint's hash is included only when the file is at hand (student machines often lack it).
    """
    pretrained, sha = resolve_pretrained(cfg.teacher.pretrained, cfg.base_dir)
    teacher = {
        "model": cfg.teacher.model,
        "pretrained": Path(pretrained).name if sha else pretrained,
        "templates": resolve_templates(cfg.teacher.templates, cfg.teacher.extra_templates),
        "quick_gelu": cfg.teacher.quick_gelu,
        "head": cfg.teacher.kind,
    }
    if sha:
        teacher["checkpoint_sha256"] = sha
    if cfg.teacher.dtype != "auto":  # auto depends on the machine that ran stage one
        teacher["dtype"] = cfg.teacher.dtype
    return build_fingerprint(teacher, dataclasses.asdict(view_recipe(cfg)), manifest, cfg.cache.top_k)


def stage_one_request(cfg: PipelineConfig, manifest: Manifest, device: torch.device) -> dict:
    """Everything stage one's output depends on, from the config and the files alone: no model is built.

    Stricter than the fingerprint (the same setting spelled another way is another request); it only lets
    a rerun of the same config find its finished store without loading the teacher.
    """
    tc = cfg.teacher
    register_model_configs(cfg.path(tc.model_config_dir) if tc.model_config_dir else None)
    pretrained, sha = resolve_pretrained(tc.pretrained, cfg.base_dir)
    adapter = dataclasses.asdict(tc.adapter)
    if tc.adapter.file and cfg.location(tc.adapter.file).is_file():
        adapter["file"] = sha256_file(cfg.location(tc.adapter.file))
    teacher = {
        "model": tc.model,
        "model_config": open_clip.get_model_config(tc.model),
        "pretrained": Path(pretrained).name if sha else pretrained,
        "checkpoint_sha256": sha,
        "image_size": tc.image_size,
        "image_mean": tc.image_mean,
        "image_std": tc.image_std,
        "quick_gelu": tc.quick_gelu,
        "templates": resolve_templates(tc.templates, tc.extra_templates),
        "kind": tc.kind,
        "adapter": adapter if tc.kind != "zero-shot" else None,
        "dtype": teacher_dtype(tc.dtype, device),
        "on_bad_image": cfg.data.on_bad_image,
    }
    return build_fingerprint(teacher, dataclasses.asdict(view_recipe(cfg)), manifest, cfg.cache.top_k)


def finished_store(cfg: PipelineConfig, request: str) -> Location | None:
    """The store made for `request` (a stage_one_request hash) when every shard is computed and verifies.

    None when there is none, or it is unfinished or damaged: stage one then builds the teacher and
    completes or repairs it. The check holds the store's write lock, so it never races a writer.
    """
    paths = [cfg.location(cfg.cache.store)] if cfg.cache.store else stores_under(cfg.location(cfg.cache.root))
    for path in paths:
        try:
            store = TeacherStore.open(path)
        except (StoreError, FileNotFoundError):
            continue
        if store.attrs.get("request") != request or not all(store.shard_done(s) for s in store.shards()):
            continue
        read_only = isinstance(path, UrlPath) and not path.writable  # nobody writes it: no lock to take
        with contextlib.nullcontext() if read_only else store_write_lock(path):
            if all(problem is None for problem in store.check_shards(progress=True).values()):
                return path
    return None


def _mismatch(store: TeacherStore, expected: dict) -> list[str]:
    """Each fingerprint field where `store` differs from what the config expects, with both values."""
    stored = dict(store.fingerprint)
    stored["teacher"] = {k: stored["teacher"].get(k) for k in expected["teacher"]}
    return described_diff(stored, expected)


def find_store(cfg: PipelineConfig, manifest: Manifest) -> TeacherStore:
    """The store for this experiment: cache.store if set, else the one under cache.root that matches.

    A store that does not match the config is refused with the fields that differ.
    """
    expected = expected_without_weights(cfg, manifest)
    if cfg.cache.store:
        store = TeacherStore.open(cfg.location(cfg.cache.store))
        fields = _mismatch(store, expected)
        if fields:
            raise StoreMismatch.of(store.path, fields, "Give the settings the store was made with, or unset "
                                                       "cache.store (or name another) and make a store for these "
                                                       "with `dho cache-teacher`.")
        return store
    root = cfg.location(cfg.cache.root)
    candidates = []
    for path in stores_under(root):
        try:
            candidates.append(TeacherStore.open(path))
        except (StoreError, FileNotFoundError) as e:
            warn(f"skipping {path}: {one_line(e).removeprefix(f'{path}: ')}")
    differences = [(s, _mismatch(s, expected)) for s in candidates]
    matching = [s for s, fields in differences if not fields]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        nearest = min(differences, key=lambda found: len(found[1]), default=None)
        near = "" if nearest is None else f" (the nearest, {nearest[0].path.name}, differs in {'; '.join(nearest[1])})"
        raise FileNotFoundError(f"no teacher store under {root} matches this config{near}: "
                                "run `dho cache-teacher` with it first (or set cache.store)")
    differ = sorted({f for other in matching[1:] for f in fingerprint_diff(matching[0].fingerprint, other.fingerprint)})
    names = ", ".join(s.path.name for s in matching)
    if not differ:
        raise StoreError(f"several stores under {root} are copies of the one this config asks for ({names}): set "
                         "cache.store to the one to use, or remove the copies")
    raise StoreError(f"several stores under {root} match this config ({names}; they differ in {', '.join(differ)}): "
                     "set cache.store to the one to use" + (" or teacher.dtype" if "teacher.dtype" in differ else ""))
