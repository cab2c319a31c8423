"""Find the teacher store of an experiment: by its fingerprint in stage one, by what stage two can check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dho_pipeline.config import PipelineConfig
from dho_pipeline.errors import one_line, warn
from dho_pipeline.shards import Manifest
from dho_pipeline.store import (
    StoreError,
    StoreMismatch,
    TeacherStore,
    build_fingerprint,
    default_store_path,
    fingerprint_diff,
)
from dho_pipeline.teacher import resolve_pretrained
from dho_pipeline.templates import resolve_templates
from dho_pipeline.views import ViewRecipe


def view_recipe(cfg: PipelineConfig) -> ViewRecipe:
    v = cfg.views
    return ViewRecipe(v.count, tuple(v.scale), tuple(v.ratio), v.flip, v.seed)


def store_path(cfg: PipelineConfig, fingerprint: dict) -> Path:
    """cache.store when set, else a name derived from the fingerprint under cache.root."""
    if cfg.cache.store:
        return cfg.path(cfg.cache.store)
    return default_store_path(cfg.path(cfg.cache.root), fingerprint)


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
    return build_fingerprint(teacher, dataclasses.asdict(view_recipe(cfg)), manifest)


def _mismatch(store: TeacherStore, expected: dict) -> list[str]:
    stored = dict(store.fingerprint)
    stored["teacher"] = {k: stored["teacher"].get(k) for k in expected["teacher"]}
    return fingerprint_diff(stored, expected)


def find_store(cfg: PipelineConfig, manifest: Manifest) -> TeacherStore:
    """The store for this experiment: cache.store if set, else the one under cache.root that matches.

    A store that does not match the config is refused with the fields that differ.
    """
    expected = expected_without_weights(cfg, manifest)
    if cfg.cache.store:
        store = TeacherStore.open(cfg.path(cfg.cache.store))
        fields = _mismatch(store, expected)
        if fields:
            raise StoreMismatch(f"{store.path}: made with other settings; fields that differ: {', '.join(fields)}")
        return store
    root = cfg.path(cfg.cache.root)
    candidates = []
    for path in sorted(root.glob("*.zarr")):
        try:
            candidates.append(TeacherStore.open(path))
        except (StoreError, FileNotFoundError) as e:
            warn(f"skipping {path}: {one_line(e).removeprefix(f'{path}: ')}")
    matching = [s for s in candidates if not _mismatch(s, expected)]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise FileNotFoundError(f"no teacher store under {root} matches this config: "
                                "run `dho cache-teacher` with it first (or set cache.store)")
    raise ValueError(f"several stores under {root} match this config ({', '.join(s.path.name for s in matching)}): "
                     "set cache.store to the one to use")
