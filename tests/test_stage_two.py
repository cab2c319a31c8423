"""Stage two: losses, replayed views, training, resume, alpha/beta search, baselines, online mode."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.data.shards import iter_shard, load_manifest
from dho_pipeline.data.student_stream import StreamSpec, StudentStream, cached_view
from dho_pipeline.data.views import decode_image, normalize, render_view, view_params
from dho_pipeline.store.lookup import find_store, view_recipe
from dho_pipeline.store.zarr_store import StoreError, TeacherStore
from dho_pipeline.student.checkpoint import load_checkpoint
from dho_pipeline.student.evaluation import HeadOutputs, accuracy, combine, search_alpha_beta
from dho_pipeline.student.losses import kd_loss, training_loss
from dho_pipeline.teacher.open_clip_teacher import load_teacher
from stages import evaluate as evaluate_stage
from stages import train_student
from tests.conftest import write_config

STUDENT = {"model": "resnet10t", "image_size": 32}


def train_config(tmp_path, shards_dir, teacher_file, store, name="run", **train):
    values = {"steps": 12, "batch_labelled": 8, "batch_unlabelled": 16, "log_every": 2, "checkpoint_every": 4,
              "out_dir": str(tmp_path / name), "lr": 2e-3}
    values.update(train)
    return write_config(tmp_path / f"{name}.yaml", shards_dir, teacher_file, student=STUDENT, train=values,
                        cache={"store": str(store)})


def losses(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kd_loss_matches_the_formula_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    by_hand = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        p_t = [math.exp(v / T) / sum(math.exp(u / T) for u in trow) for v in trow]
        p_s = [math.exp(v / T) / sum(math.exp(u / T) for u in srow) for v in srow]
        by_hand += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    by_hand = T**2 * by_hand / 2
    assert kd_loss(s, t, T).item() == pytest.approx(by_hand, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_training_loss_weights_each_method():
    g = torch.Generator().manual_seed(0)
    ce_l, kd_l, ce_u, kd_u, t_l, t_u = (torch.randn(4, 5, generator=g) for _ in range(6))
    y = torch.tensor([0, 1, 2, 3])
    ce = torch.nn.functional.cross_entropy(ce_l, y).item()
    kdl, kdu = kd_loss(kd_l, t_l).item(), kd_loss(kd_u, t_u).item()
    args = ((ce_l, kd_l), y, t_l, (ce_u, kd_u), t_u, 2.0)
    assert training_loss("dho", *args, "few_shot")[0].item() == pytest.approx(0.5 * ce + 0.5 * (kdl + kdu), rel=1e-5)
    assert training_loss("dho", *args, "semi_supervised")[0].item() == pytest.approx(ce + kdl + kdu, rel=1e-5)
    single = ce + kd_loss(ce_l, t_l).item() + kd_loss(ce_u, t_u).item()
    assert training_loss("single_head_kd", *args)[0].item() == pytest.approx(single, rel=1e-5)
    assert training_loss("ce_only", (ce_l, kd_l), y)[0].item() == pytest.approx(ce, rel=1e-6)


def test_stream_replays_the_view_the_teacher_saw(cached_store, shards_dir, teacher_file, tmp_path):
    cfg = load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store))
    manifest = load_manifest(shards_dir)
    teacher = load_teacher(cfg.teacher, manifest.class_names, torch.device("cpu"))
    spec = StreamSpec(student_size=40, seed=3, teacher_size=teacher.image_size)
    batch = next(iter(StudentStream(manifest.splits["unlabelled"], str(cached_store), spec, batch_size=6)))
    raw = {}
    for shard in manifest.splits["unlabelled"]:
        raw.update({int(s["id"]): s["png"] for s in iter_shard(shard)})
    recipe = view_recipe(cfg)
    for k, row in enumerate(batch["row"].tolist()):
        image = decode_image(raw[row])
        view = cached_view(row, 0, recipe.count, spec.seed)
        box, flip = view_params(recipe, row, view, 28, 28)
        assert torch.equal(batch["teacher_images"][k], render_view(image, box, flip, teacher.image_size))
        assert torch.equal(batch["images"][k], render_view(image, box, flip, 40))
    online = teacher.logits(normalize(batch["teacher_images"], teacher.mean, teacher.std))
    np.testing.assert_allclose(batch["teacher_logits"].numpy(), online.numpy(), rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_at_any_batch(cached_store, shards_dir, workers):
    manifest = load_manifest(shards_dir)
    spec = StreamSpec(student_size=16, seed=1)

    def batches(start, count):
        stream = StudentStream(manifest.splits["unlabelled"], str(cached_store), spec, 16, start_batch=start)
        loader = iter(DataLoader(stream, batch_size=None, num_workers=workers))
        return [next(loader)["row"].tolist() for _ in range(count)]

    whole = batches(0, 20)
    assert batches(7, 13) == whole[7:]
    first = [r for b in whole[:6] for r in b]
    assert len(set(first)) == len(first), "a row came twice before its epoch was through"
    assert {r for b in whole for r in b} == set(manifest.split_rows("unlabelled").tolist())


def test_short_run_lowers_the_loss_and_beats_chance(cached_store, shards_dir, teacher_file, tmp_path):
    run = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=40,
                                                     log_every=5)))
    records = [r for r in losses(run) if "loss" in r]
    assert np.mean([r["loss"] for r in records[-2:]]) < np.mean([r["loss"] for r in records[:2]])
    result = evaluate_stage.run(run / "final.pt")
    assert result["ce_head"] > 0.25, result  # chance is 0.10
    assert result["combined_searched"] >= result["combined_default"] - 0.1
    assert set(result) >= {"ce_head", "kd_head", "combined_default", "combined_searched", "alpha", "beta", "teacher"}


def test_stop_and_resume_gives_the_same_metrics(cached_store, shards_dir, teacher_file, tmp_path):
    whole = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, "whole")))
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, "resumed")
    runner = CliRunner()
    first = runner.invoke(main, ["train-student", "-c", str(config), "--max-steps", "5"])
    assert first.exit_code == 0, first.output
    assert first.stdout == (f"run: {tmp_path / 'resumed'}  (stopped at step 5 of 12 by --max-steps; continue with "
                            f"dho train-student -c {config} --resume)\n")
    assert not (tmp_path / "resumed" / "final.pt").exists()
    more = runner.invoke(main, ["train-student", "-c", str(config), "--resume", "--max-steps", "2"])  # 2 more
    assert "(stopped at step 7 of 12 by --max-steps;" in more.stdout, more.output
    second = runner.invoke(main, ["train-student", "-c", str(config), "--resume"])
    assert second.exit_code == 0, second.output
    assert second.stdout.startswith(f"run: {tmp_path / 'resumed'}  (val top-1 "), second.output
    assert losses(tmp_path / "resumed") == losses(whole)
    a = load_checkpoint(whole / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_alpha_beta_search_returns_the_best_grid_point():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    ce = torch.randn(200, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 5)
    kd = torch.randn(200, 5, generator=g) * 3 + 3.0 * torch.nn.functional.one_hot(labels, 5)
    out = HeadOutputs(ce, kd, labels, torch.arange(200))
    alphas, betas = [i / 20 for i in range(21)], [0.5, 1.0, 2.0, 4.0]
    alpha, beta, best = search_alpha_beta(out, alphas, betas)
    grid = {(a, b): accuracy(combine(ce, kd, a, b), labels) for b in betas for a in alphas}
    assert best == max(grid.values()) == grid[(alpha, beta)]
    assert best > max(grid[(1.0, 1.0)], grid[(0.0, 1.0)]) - 1e-9


@pytest.mark.parametrize("method", ["single_head_kd", "ce_only"])
def test_baselines_run_from_the_same_store(method, cached_store, shards_dir, teacher_file, tmp_path):
    run = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=4,
                                                     method=method)))
    final = load_checkpoint(run / "final.pt")
    assert final["method"] == method and (final["alpha"], final["beta"]) == (1.0, 1.0)
    assert final["store"] == str(cached_store)
    parts = [r for r in losses(run) if "loss" in r][0]
    assert ("kd_u" in parts) == (method == "single_head_kd")
    result = evaluate_stage.run(run / "final.pt")  # the untrained KD head is never mixed in
    assert result["combined_default"] == result["combined_searched"] == result["ce_head"]
    assert (result["alpha"], result["method"]) == (1.0, method)


def test_online_and_cached_modes_give_the_same_first_step(cached_store, shards_dir, teacher_file, tmp_path):
    cached = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, "cached",
                                                        steps=1, log_every=1)))
    online_cfg = load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, "online", steps=1,
                                          log_every=1), ["teacher.mode=online"])
    online = train_student.run(online_cfg)
    a, b = losses(cached)[0], losses(online)[0]
    assert a["ce"] == b["ce"]
    for key in ("loss", "kd_l", "kd_u"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), key


@pytest.mark.parametrize(("method", "steps", "warned"), [("dho", 40, True), ("dho", 24, False), ("ce_only", 40, False)])
def test_a_run_that_outlasts_the_stores_views_is_warned(method, steps, warned, cached_store, shards_dir, teacher_file,
                                                        tmp_path, capsys):
    # 120 unlabelled images, 16 a step: 8 steps a pass; the store has 3 random views of each
    cfg = load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=steps, method=method))
    train_student.run(cfg, max_steps=1)
    message = f"makes {steps / 8:g} passes over the unlabelled images but the store holds 3 random views"
    assert (message in capsys.readouterr().err) == warned


def test_train_student_refuses_a_store_of_other_views(cached_store, shards_dir, teacher_file, tmp_path):
    cfg = load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store), ["views.count=5"])
    with pytest.raises(ValueError, match=r"fields that differ: views\.count: store 3 vs config 5\. Give the "
                                         r"settings the store was made with, or unset cache\.store \(or name "
                                         r"another\) and make a store for these with `dho cache-teacher`\.$"):
        find_store(cfg, load_manifest(shards_dir))


def test_no_store_under_the_root_names_the_nearest_and_how_it_differs(cached_store, shards_dir, teacher_file, tmp_path):
    cfg = load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store),
                      ["cache.store=null", f"cache.root={cached_store.parent}", "views.ratio=[0.75, 1.3333333]"])
    with pytest.raises(FileNotFoundError, match=rf"the nearest, {cached_store.name}, differs in views\.ratio: store "
                                                r"\[0\.75, 1\.3333333333333333\] vs config \[0\.75, 1\.3333333\]\)"):
        find_store(cfg, load_manifest(shards_dir))


def test_a_store_of_other_shards_is_refused_naming_the_first_shard_that_differs(cached_store, shards_dir,
                                                                                 teacher_file, tmp_path):
    other = Path(shutil.copytree(shards_dir, tmp_path / "shards"))
    manifest = json.loads((other / "manifest.json").read_text())
    changed = manifest["splits"]["unlabelled"]["shards"][1]
    changed["sha256"] = "0" * 64  # as a shard made from other images
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(train_config(tmp_path, other, teacher_file, cached_store))
    shards = TeacherStore.open(cached_store).fingerprint["shards"]
    position = next(i for i, entry in enumerate(shards) if entry[0] == changed["file"])
    with pytest.raises(ValueError, match=rf"shards\[{position}\]: store \['{changed['file']}', \d+, 32, "
                                         r"'[0-9a-f]{40}[^ ]* vs config \['" + changed["file"]):
        find_store(cfg, load_manifest(other))


def test_copies_of_the_matching_store_under_the_root_are_named_as_copies(cached_store, shards_dir, teacher_file,
                                                                         tmp_path):
    for copy in ("a.zarr", "b.zarr"):
        shutil.copytree(cached_store, tmp_path / "root" / copy)
    cfg = load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store),
                      ["cache.store=null", f"cache.root={tmp_path / 'root'}"])
    with pytest.raises(StoreError, match=r"several stores under .*root are copies of the one this config asks for "
                                         r"\(a\.zarr, b\.zarr\): set cache\.store to the one to use, or remove"):
        find_store(cfg, load_manifest(shards_dir))


def test_predict_prints_top_k_classes(cached_store, shards_dir, teacher_file, tmp_path, fmnist):
    run = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=2)))
    image = tmp_path / "shoe.png"
    image.write_bytes(fmnist.read(("test", 0))[0])
    result = CliRunner().invoke(main, ["predict", str(run / "final.pt"), str(image), "--top-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)[str(image)]
    assert len(top) == 2 and top[0][0] in fmnist.class_names and top[0][1] >= top[1][1]


def test_a_run_from_relative_paths_evaluates_from_any_directory(cached_store, shards_dir, teacher_file, tmp_path,
                                                                 monkeypatch, capsys):
    """Paths relative to the config are recorded absolute: evaluate works from elsewhere, and says when the
    store it was trained from is gone."""
    project = tmp_path / "project"
    shutil.copytree(shards_dir, project / "shards")
    shutil.copytree(cached_store, project / "store.zarr")
    config = write_config(project / "p.yaml", project / "shards", teacher_file, student=STUDENT,
                          cache={"store": "store.zarr"},
                          train={"steps": 2, "batch_labelled": 8, "batch_unlabelled": 8, "out_dir": "run"})
    config.write_text(config.read_text().replace(str(project / "shards"), "shards"))
    monkeypatch.chdir(project)
    run = train_student.run(load_config(Path("p.yaml")))
    final = load_checkpoint(project / "run" / "final.pt")
    assert run.is_absolute() and Path(final["shards"]).is_absolute() and Path(final["store"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert evaluate_stage.run(Path("project/run/final.pt"))["teacher"] is not None
    (project / "store.zarr").rename(project / "moved.zarr")
    assert evaluate_stage.run(Path("project/run/final.pt"))["teacher"] is None
    assert "store.zarr: the store this student was trained from is not there" in capsys.readouterr().err
