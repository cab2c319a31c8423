"""Stage one: shards and splits, cached logits equal the teacher on the replayed view, resume, refusal."""

from __future__ import annotations

import json
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.data.samples import ShardDataError, parse_sample
from dho_pipeline.data.shards import iter_shard, load_manifest, sha256_file, write_shards
from dho_pipeline.data.splits import split_source
from dho_pipeline.data.teacher_views import TeacherViewBatches
from dho_pipeline.data.views import ViewRecipe, normalize, render_view, view_params
from dho_pipeline.store import report as store_report
from dho_pipeline.store.lookup import view_recipe
from dho_pipeline.store.zarr_store import StoreMismatch, TeacherStore
from dho_pipeline.student.checkpoint import load_checkpoint
from dho_pipeline.teacher.open_clip_teacher import load_teacher
from stages import cache_teacher, evaluate, train_student
from tests.conftest import SHARD_SIZE, write_config


def test_splits_are_class_balanced_and_seeded(fmnist):
    kwargs = dict(shots=4, val_per_class=5, test_per_class=10, max_train_per_class=16)
    a = split_source(fmnist, seed=1, **kwargs)
    b = split_source(fmnist, seed=1, **kwargs)
    c = split_source(fmnist, seed=2, **kwargs)
    assert {k: len(v) for k, v in a.items()} == {"labelled": 40, "unlabelled": 120, "val": 50, "test": 100}
    assert np.bincount([it.label for it in a["labelled"]]).tolist() == [4] * 10
    assert [it.ref for it in a["labelled"]] == [it.ref for it in b["labelled"]]
    assert [it.ref for it in a["labelled"]] != [it.ref for it in c["labelled"]]
    refs = [it.ref for split in ("labelled", "unlabelled", "val") for it in a[split]]
    assert len(set(refs)) == len(refs), "a training image landed in two splits"
    percent = split_source(fmnist, percent=10, val_per_class=0, test_per_class=2, seed=1)
    assert np.bincount([it.label for it in percent["labelled"]]).tolist() == [600] * 10


def test_manifest_lists_shards_with_rows_and_hashes(shards_dir):
    manifest = load_manifest(shards_dir)
    assert manifest.class_names[0] == "t-shirt"
    assert {s: manifest.split_count(s) for s in manifest.splits} == {
        "labelled": 40, "unlabelled": 120, "val": 50, "test": 100}
    for shard in manifest.shards():
        assert shard.first_row % SHARD_SIZE == 0, "every shard must start a store chunk"
        assert sha256_file(shard.path) == shard.sha256


def test_shards_are_byte_reproducible_without_pax_headers(fmnist, tmp_path):
    splits = split_source(fmnist, shots=1, val_per_class=1, test_per_class=1, max_train_per_class=3, seed=1)
    first = write_shards(fmnist, splits, tmp_path / "a", shard_size=SHARD_SIZE)
    second = write_shards(fmnist, splits, tmp_path / "b", shard_size=SHARD_SIZE)
    assert [s.sha256 for s in first.shards()] == [s.sha256 for s in second.shards()]
    with tarfile.open(first.shards()[0].path) as tar:
        assert all(not member.pax_headers for member in tar.getmembers())


def test_make_shards_cli(tmp_path):
    out = tmp_path / "shards"
    args = ["make-shards", "/usr/share/datasets/fashion-mnist", str(out), "--shots", "1", "--val-per-class", "1",
            "--test-per-class", "2", "--max-train-per-class", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["unlabelled"]["count"] == 20
    assert {k: v for k, v in manifest["info"].items() if k != "class_counts"} == {
        "source": "/usr/share/datasets/fashion-mnist", "out": str(out), "shots": 1, "percent": None,
        "val_per_class": 1, "test_per_class": 2, "max_train_per_class": 3, "split_file": None, "split_rule": "coop",
        "labelled_list": None, "test_only": False, "train_shards": None, "class_map": None, "shard_size": 1000,
        "seed": 1}, "every make-shards argument"
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "manifest.json exists" in again.output


def test_make_shards_warns_when_it_writes_no_val_or_no_test_split(tmp_path):
    args = ["make-shards", "/usr/share/datasets/fashion-mnist", "--shots", "1", "--test-per-class", "1",
            "--max-train-per-class", "2"]
    without = CliRunner().invoke(main, [*args[:2], str(tmp_path / "a"), *args[2:]])
    assert without.exit_code == 0, without.output
    assert "warning: no val split: train-student's DHO keeps the default alpha/beta" in without.stderr
    assert "add --val-per-class N" in without.stderr
    with_val = CliRunner().invoke(main, [*args[:2], str(tmp_path / "b"), *args[2:], "--val-per-class", "1"])
    assert with_val.exit_code == 0 and "warning" not in with_val.stderr, with_val.output
    no_test = CliRunner().invoke(main, [*args[:2], str(tmp_path / "c"), "--shots", "1", "--max-train-per-class", "2",
                                        "--val-per-class", "1", "--test-per-class", "0"])
    assert no_test.exit_code == 0, no_test.output
    assert no_test.stderr.endswith("\nwarning: no test split: dho evaluate will have no test images to score; add "
                                   "--test-per-class N (carved from the training images when SOURCE has no test "
                                   "part)\n"), no_test.stderr
    assert no_test.stderr.count("warning: ") == 1, no_test.stderr


def test_cached_logits_equal_teacher_on_replayed_view(cached_store, shards_dir, teacher_file, tmp_path):
    cfg = load_config(write_config(tmp_path / "p.yaml", shards_dir, teacher_file))
    manifest = load_manifest(shards_dir)
    teacher = load_teacher(cfg.teacher, manifest.class_names, torch.device("cpu"))
    store = TeacherStore.open(cached_store)
    recipe = view_recipe(cfg)
    shard = manifest.splits["unlabelled"][1]
    rows = store.read_shard(shard)
    for position, raw in enumerate(list(iter_shard(shard))[:4]):
        sample = parse_sample(raw, shard, position, skip_bad=False)
        for view in range(1 + recipe.count):
            box, flip = view_params(recipe, sample.row, view, 28, 28)
            np.testing.assert_array_equal(rows.boxes[position, view], box)
            assert rows.flips[position, view] == flip
            image = render_view(sample.image, box, flip, teacher.image_size)[None]
            expected = teacher.logits(normalize(image, teacher.mean, teacher.std))[0].numpy()
            np.testing.assert_allclose(rows.logits[position, view].astype(np.float32), expected,
                                       rtol=2e-3, atol=2e-2)
    assert rows.done.all() and (rows.labels >= 0).all()
    assert len({tuple(b) for b in rows.boxes[:, 1:].reshape(-1, 4).tolist()}) > 10, "random views must differ"


def test_view_batches_from_loader_workers_equal_the_in_process_ones(shards_dir):
    """Worker batches are rendered straight into shared memory; they must hold exactly what one process renders."""
    manifest = load_manifest(shards_dir)
    shards = manifest.splits["labelled"][:1] + manifest.splits["unlabelled"][:2]

    def batches(workers: int) -> list[dict]:
        dataset = TeacherViewBatches(shards, ViewRecipe(count=3), 24, images_per_batch=4 * 7)
        loaded = DataLoader(dataset, batch_size=None, num_workers=workers)
        return sorted(loaded, key=lambda batch: (batch["shard"], batch["rows"][0]))

    local, forked = batches(0), batches(2)
    assert len(local) == len(forked) and len(local) > len(shards)
    assert any(len(batch["rows"]) < 7 for batch in local)  # a shard ends on a partial batch
    for one, other in zip(local, forked, strict=True):
        assert other["images"].shape == one["images"].shape == (len(one["rows"]), 4, 3, 24, 24)
        assert torch.equal(other["images"], one["images"])
        assert all(np.array_equal(other[key], one[key]) for key in ("rows", "labels", "boxes", "flips", "bad"))


def test_eval_splits_hold_the_clean_view_only(cached_store):
    store = TeacherStore.open(cached_store)
    test_rows = store.split_rows()["test"]
    logits = store.group["logits"][test_rows[0]: test_rows[-1] + 1]
    assert not np.isnan(logits[:, 0]).any() and np.isnan(logits[:, 1:]).all()


def test_interrupted_run_resumes_to_the_identical_store(cached_store, shards_dir, teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file,
                          cache={"store": str(tmp_path / "resumed.zarr")})
    cfg = load_config(config)
    stopped = cache_teacher.run(cfg, max_shards=3)  # stands for a job killed after three shards
    partial = TeacherStore.open(tmp_path / "resumed.zarr")
    assert 0 < partial.group["done"][:].sum() < len(np.concatenate(list(partial.split_rows().values())))
    left = len(partial.shards()) - 3
    assert stopped.summary().endswith(f"\nunfinished: {left} shards left; the same command without --max-shards "
                                      "computes them")
    assert "unfinished" not in cache_teacher.run(cfg).summary()
    resumed, whole = TeacherStore.open(tmp_path / "resumed.zarr"), TeacherStore.open(cached_store)
    assert resumed.fingerprint == whole.fingerprint
    for name in ("logits", "boxes", "flips", "labels", "bad", "done"):
        np.testing.assert_array_equal(resumed.group[name][:], whole.group[name][:], err_msg=name)


def test_store_with_other_templates_or_checkpoint_is_refused(cached_store, shards_dir, teacher_file, tmp_path):
    store = {"store": str(cached_store)}
    other_templates = write_config(tmp_path / "a.yaml", shards_dir, teacher_file, cache=store,
                                   teacher={"templates": None, "extra_templates": ["a {}."]})
    with pytest.raises(StoreMismatch, match=r"teacher\.templates: store .* vs config \['a \{\}\.'\]"):
        cache_teacher.run(load_config(other_templates))
    other_file = tmp_path / "other.pt"
    state = torch.load(teacher_file)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, other_file)
    other_checkpoint = write_config(tmp_path / "b.yaml", shards_dir, other_file, cache=store)
    result = CliRunner().invoke(main, ["cache-teacher", "-c", str(other_checkpoint)])
    assert result.exit_code == 1
    assert "teacher.checkpoint_sha256" in result.output and "--overwrite" in result.output
    assert TeacherStore.open(cached_store).group["done"][:].any(), "a refused run must not touch the store"


def test_same_settings_find_and_reuse_the_store(cached_store, shards_dir, teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"root": str(cached_store.parent)})
    mtime = (cached_store / "logits" / "zarr.json").stat().st_mtime_ns
    assert cache_teacher.run(load_config(config)).path == cached_store
    assert (cached_store / "logits" / "zarr.json").stat().st_mtime_ns == mtime
    listed = CliRunner().invoke(main, ["cache", "list", "--root", str(cached_store.parent)])
    assert cached_store.name in listed.output and "done=100%" in listed.output


def test_inspect_json_reports_a_finished_store(cached_store):
    result = CliRunner().invoke(main, ["cache", "inspect", str(cached_store), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["done_fraction"] == 1.0
    assert (report["rows"], report["views"], report["classes"], report["dtype"]) == (310, 4, 10, "float16")
    assert report["bytes_per_view"] > 0 and len(report["fingerprint"]) == 64
    assert set(report["teacher_accuracy"]) == {"labelled", "unlabelled", "val", "test"}
    assert all(0 <= acc <= 1 for acc in report["teacher_accuracy"].values())


class CorruptOne:
    """A source whose images `bad_refs` are not images."""

    def __init__(self, source, *bad_refs):
        self.source, self.bad_refs, self.class_names = source, bad_refs, source.class_names

    def read(self, ref):
        return (b"not an image", "png") if ref in self.bad_refs else self.source.read(ref)


def test_corrupt_image_is_named_or_skipped_and_counted(fmnist, teacher_file, tmp_path, monkeypatch):
    splits = split_source(fmnist, shots=1, val_per_class=0, test_per_class=1, max_train_per_class=2, seed=3)
    write_shards(CorruptOne(fmnist, splits["unlabelled"][5].ref, splits["test"][1].ref), splits,
                 tmp_path / "shards", shard_size=8)
    config = write_config(tmp_path / "p.yaml", tmp_path / "shards", teacher_file)
    manifest = load_manifest(tmp_path / "shards")
    bad_row = manifest.splits["unlabelled"][0].first_row + 5
    with pytest.raises(ShardDataError, match=rf"unlabelled-00000\.tar: sample '{bad_row:09d}': cannot decode image"):
        cache_teacher.run(load_config(config))
    run = cache_teacher.run(load_config(config, ["data.on_bad_image=skip"]))
    assert f"2 bad images skipped (listed by `dho cache inspect {run.path}`)" in run.summary()
    again = cache_teacher.run(load_config(config, ["data.on_bad_image=skip"]))
    assert not again.views and "2 bad images skipped" in again.summary(), "a rerun says so too"
    report = json.loads(CliRunner().invoke(main, ["cache", "inspect", str(run.path), "--json"]).output)
    assert report["bad_rows"] == 2 and report["done_fraction"] == 1.0
    assert TeacherStore.open(run.path).missing_chunk_files() == {}, "bad rows hold fill values: no chunk is missing"
    test_row = manifest.splits["test"][0].first_row + 1
    assert report["bad_images"] == [{"shard": "unlabelled-00000.tar", "key": f"{bad_row:09d}"},
                                    {"shard": "test-00000.tar", "key": f"{test_row:09d}"}]
    monkeypatch.setattr(store_report, "LISTED_BAD_IMAGES", 1)
    text = CliRunner().invoke(main, ["cache", "inspect", str(run.path)]).output
    assert f"bad image    unlabelled-00000.tar sample '{bad_row:09d}'\n             and 1 more\n" in text


def test_skip_reaches_validation_the_final_search_and_evaluate(fmnist, teacher_file, tmp_path):
    """data.on_bad_image: skip holds in every reader: a bad val or test image no longer ends a finished run."""
    splits = split_source(fmnist, shots=1, val_per_class=1, test_per_class=1, max_train_per_class=2, seed=3)
    write_shards(CorruptOne(fmnist, splits["val"][2].ref, splits["test"][3].ref), splits, tmp_path / "shards",
                 shard_size=8)
    config = write_config(tmp_path / "p.yaml", tmp_path / "shards", teacher_file, data={"on_bad_image": "skip"},
                          student={"model": "resnet10t", "image_size": 32},
                          train={"steps": 2, "batch_labelled": 4, "batch_unlabelled": 4, "log_every": 1,
                                 "out_dir": str(tmp_path / "run")})
    cache_teacher.run(load_config(config))
    run = train_student.run(load_config(config))
    assert (run / "final.pt").is_file()
    assert sum("val" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()) == 1
    result = evaluate.run(run / "final.pt")
    assert result["images"] == len(splits["test"]) - 1
    # the store's marks alone leave the bad val and test images out, as in training, whatever stage two's setting
    strict = train_student.run(load_config(config, ["data.on_bad_image=error", f"train.out_dir={tmp_path / 'strict'}"]))
    assert load_checkpoint(strict / "final.pt")["val_top1"] is not None
    assert evaluate.run(strict / "final.pt")["images"] == len(splits["test"]) - 1


def test_a_val_split_of_bad_images_alone_keeps_the_default_alpha_and_beta(fmnist, teacher_file, tmp_path, capsys):
    splits = split_source(fmnist, shots=1, val_per_class=1, test_per_class=1, max_train_per_class=2, seed=3)
    write_shards(CorruptOne(fmnist, *(item.ref for item in splits["val"])), splits, tmp_path / "shards", shard_size=8)
    config = write_config(tmp_path / "p.yaml", tmp_path / "shards", teacher_file, data={"on_bad_image": "skip"},
                          student={"model": "resnet10t", "image_size": 32},
                          train={"steps": 2, "batch_labelled": 4, "batch_unlabelled": 4,
                                 "out_dir": str(tmp_path / "run")})
    cache_teacher.run(load_config(config))
    final = load_checkpoint(train_student.run(load_config(config)) / "final.pt")
    assert (final["alpha"], final["beta"], final["val_top1"]) == (0.4, 0.5, None)
    assert "every val image of" in capsys.readouterr().err


def test_a_command_a_message_suggests_can_be_pasted_whatever_spaces_its_paths_hold():
    report = cache_teacher.StageOneReport(Path("/data/my cache/t.zarr"), sources=Path("/data/my shards"), bad_images=2)
    command = re.search(r"`([^`]*)`", report.summary()).group(1)
    assert shlex.split(command) == ["dho", "cache", "inspect", "/data/my cache/t.zarr", "--shards", "/data/my shards"]
