"""Tip-Adapter and Tip-Adapter-F teachers: zero-shot at a = 0, gains on val, grid search, store refusal."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dho_pipeline.cli import main
from dho_pipeline.config import AdapterConfig, load_config
from dho_pipeline.data.shards import load_manifest, write_shards
from dho_pipeline.data.splits import split_source
from dho_pipeline.errors import CheckpointError
from dho_pipeline.store.lookup import view_recipe
from dho_pipeline.store.zarr_store import StoreMismatch
from dho_pipeline.teacher.open_clip_teacher import load_teacher
from dho_pipeline.teacher.tip_adapter import (
    ADAPTER_FORMAT,
    TipAdapter,
    fit_adapter,
    load_adapter,
    save_adapter,
    search_ab,
    tip_logits,
    train_keys,
)
from stages import cache_teacher
from tests.conftest import SHARD_SIZE, RunsCodeOnLoad, one_line_error, write_config

ADAPTER = {"augment_epochs": 3, "epochs": 10, "search_b_steps": 40, "search_a_steps": 10}


@pytest.fixture(scope="module")
def few_shot_shards(fmnist, tmp_path_factory):
    """16 shots and 30 val images per class, no unlabelled or test images: what an adapter fit reads."""
    out = tmp_path_factory.mktemp("few-shot-shards")
    splits = split_source(fmnist, shots=16, val_per_class=30, test_per_class=0, max_train_per_class=16, seed=2)
    write_shards(fmnist, splits, out, shard_size=SHARD_SIZE)
    return out


@pytest.fixture(scope="module")
def fitted(few_shot_shards, trained_teacher_file, tmp_path_factory):
    """Both adapters fitted on 16 shots per class with the (briefly pretrained) demo teacher."""
    config = write_config(tmp_path_factory.mktemp("tip") / "p.yaml", few_shot_shards, trained_teacher_file,
                          teacher={"adapter": ADAPTER})
    cfg = load_config(config)
    manifest = load_manifest(few_shot_shards)
    teacher = load_teacher(cfg.teacher, manifest.class_names, torch.device("cpu"))
    reports = {kind: fit_adapter(teacher, manifest, view_recipe(cfg), kind, cfg.teacher.adapter,
                                 torch.device("cpu"), log=lambda *_: None) for kind in ("tip-adapter", "tip-adapter-f")}
    return teacher, reports


def test_adapter_with_a_zero_is_the_zero_shot_head(fitted):
    teacher, reports = fitted
    adapter, _ = reports["tip-adapter"]
    features = torch.nn.functional.normalize(torch.randn(7, teacher.classifier.shape[0]), dim=-1)
    zero = TipAdapter(adapter.kind, adapter.keys, adapter.values, a=0.0, b=adapter.b)
    torch.testing.assert_close(zero.logits(features, teacher.classifier), teacher.zero_shot(features))
    assert not torch.allclose(adapter.logits(features, teacher.classifier), teacher.zero_shot(features))


def test_few_shot_adapter_beats_zero_shot_on_val(fitted):
    _, reports = fitted
    report = reports["tip-adapter"][1]
    assert report["labelled_images"] == 160 and report["shots_per_class"] == 16 and "shots" not in report
    assert report["val_adapter"] > report["val_zero_shot"], report


def test_trained_keys_are_at_least_as_good_on_val(fitted):
    _, reports = fitted
    assert reports["tip-adapter-f"][1]["val_adapter"] >= reports["tip-adapter"][1]["val_adapter"]


def test_training_the_keys_lowers_the_training_loss(fitted):
    teacher, reports = fitted
    adapter = reports["tip-adapter"][0]
    g = torch.Generator().manual_seed(0)
    train = F.normalize(adapter.keys[:, None] + 0.3 * torch.randn(len(adapter.keys), 3, adapter.keys.shape[1],
                                                                    generator=g), dim=-1)
    labels = adapter.values.argmax(-1)

    def loss(keys: torch.Tensor) -> float:
        logits = tip_logits(train.flatten(0, 1), teacher.classifier, keys, adapter.values, adapter.a, adapter.b)
        return float(F.cross_entropy(logits, labels.repeat_interleave(3)))

    trained = train_keys(adapter.keys, adapter.values, train, labels, teacher.classifier, adapter.a, adapter.b,
                         AdapterConfig(epochs=5), log=lambda *_: None)
    assert loss(trained) < loss(adapter.keys)


def test_search_returns_the_best_grid_point():
    g = torch.Generator().manual_seed(0)
    d, c, n = 16, 4, 120
    classifier = torch.nn.functional.normalize(torch.randn(d, c, generator=g), dim=0)
    keys = torch.nn.functional.normalize(torch.randn(20, d, generator=g), dim=-1)
    values = torch.nn.functional.one_hot(torch.arange(20) % c, c).float()
    feats = torch.nn.functional.normalize(torch.randn(n, d, generator=g) + keys[torch.arange(n) % 20], dim=-1)
    labels = torch.arange(n) % 20 % c
    cfg = AdapterConfig(search_a_max=5, search_a_steps=10, search_b_max=12, search_b_steps=12)
    a, b, best = search_ab(feats, labels, classifier, keys, values, cfg)
    grid = {(float(a_), float(b_)): float((tip_logits(feats, classifier, keys, values, float(a_), float(b_))
                                           .argmax(-1) == labels).float().mean())
            for b_ in np.linspace(0, 12, 13)[1:] for a_ in np.linspace(0, 5, 11)[1:]}
    assert best == pytest.approx(max(grid.values())) and grid[(a, b)] == pytest.approx(best)


def test_store_of_another_adapter_is_refused_and_inspect_reports_both(few_shot_shards, trained_teacher_file, tmp_path):
    store = str(tmp_path / "tip.zarr")
    first = write_config(tmp_path / "a.yaml", few_shot_shards, trained_teacher_file, cache={"store": store},
                         teacher={"kind": "tip-adapter", "adapter": ADAPTER})
    path = cache_teacher.run(load_config(first)).path
    assert (tmp_path / "cache" / "adapters").is_dir(), "the fitted adapter is kept for reuse"
    report = json.loads(CliRunner().invoke(main, ["cache", "inspect", str(path), "--json"]).output)
    assert report["fingerprint_fields"]["teacher"]["head"] == "tip-adapter"
    assert report["teacher_zero_shot_accuracy"]["val"] is not None
    assert report["teacher_accuracy"]["val"] > report["teacher_zero_shot_accuracy"]["val"]
    other = write_config(tmp_path / "b.yaml", few_shot_shards, trained_teacher_file, cache={"store": store},
                         teacher={"kind": "tip-adapter", "adapter": {**ADAPTER, "augment_epochs": 2}})
    with pytest.raises(StoreMismatch, match=r"teacher\.adapter_sha256"):
        cache_teacher.run(load_config(other))


def test_fit_adapter_cli_writes_a_file_cache_teacher_takes(few_shot_shards, trained_teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", few_shot_shards, trained_teacher_file,
                          teacher={"kind": "tip-adapter-f", "adapter": {**ADAPTER, "epochs": 2}})
    out = tmp_path / "adapter.pt"
    result = CliRunner().invoke(main, ["fit-adapter", "-c", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and '"kind": "tip-adapter-f"' in result.output
    path = cache_teacher.run(load_config(config, [f"teacher.adapter.file={out}"])).path
    assert load_config(config).teacher.kind == "tip-adapter-f" and (path / "zero_shot").is_dir()

    def cache_with(*settings: str):
        command = ["cache-teacher", "-c", str(config), "--set", f"teacher.adapter.file={out}"]
        return CliRunner().invoke(main, [*command, *(arg for s in settings for arg in ("--set", s))])

    one_line_error(cache_with("teacher.kind=tip-adapter"), f"teacher.kind is tip-adapter, but {out} "
                   "(teacher.adapter.file) holds a tip-adapter-f adapter: set teacher.kind tip-adapter-f, or fit")
    one_line_error(cache_with("teacher.templates=generic"), f"{out}: fitted for another teacher (teacher.templates: "
                   "file ['a photo of a {}.', 'a black and white photo of a {}.'", "vs config ['a photo of a {}.']);")


def test_fit_adapter_warns_when_a_or_b_ends_at_the_top_of_its_grid(few_shot_shards, trained_teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", few_shot_shards, trained_teacher_file,
                          teacher={"kind": "tip-adapter", "adapter": {**ADAPTER, "search_a_max": 0.01,
                                                                      "search_a_steps": 1}})
    result = CliRunner().invoke(main, ["fit-adapter", "-c", str(config), "--out", str(tmp_path / "adapter.pt")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["a"] == 0.01 and report["labelled_images"] == 160 and report["shots_per_class"] == 16
    assert "the searched a=0.01 is the top of its grid" in result.stderr
    assert "raise teacher.adapter.search_a_max" in result.stderr and "search_b_max" not in result.stderr


def test_an_adapter_file_that_would_run_code_is_refused_unrun(tmp_path):
    bad = tmp_path / "adapter.pt"
    torch.save({"format": ADAPTER_FORMAT, "keys": RunsCodeOnLoad(tmp_path / "ran")}, bad)
    with pytest.raises(CheckpointError, match=r"adapter\.pt: not a dho adapter file .*refused: loading it would call"):
        load_adapter(bad, {})
    assert not (tmp_path / "ran").exists()


def test_two_jobs_saving_the_same_adapter_at_once_both_succeed(tmp_path, monkeypatch):
    """Two jobs fitting the same adapter (a sweep over settings it does not depend on) save it at about the same
    moment: here both have written their temporary file before either renames it."""
    keys = torch.randn(20, 8)
    adapter = TipAdapter("tip-adapter", keys, torch.eye(4)[torch.arange(20) % 4], a=1.0, b=5.0)
    both_written = threading.Barrier(2, timeout=10)
    write_bytes = Path.write_bytes

    def write_then_wait(path: Path, data: bytes) -> int:
        written = write_bytes(path, data)
        both_written.wait()
        return written

    monkeypatch.setattr(Path, "write_bytes", write_then_wait)
    path = tmp_path / "adapters" / "tip-adapter-0123.pt"
    with ThreadPoolExecutor(2) as jobs:
        shas = list(jobs.map(lambda _: save_adapter(path, adapter, {"model": "m"}, {}), range(2)))
    loaded, sha = load_adapter(path, {"model": "m"})
    assert shas == [sha, sha] and torch.equal(loaded.keys, keys)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
