"""Stage one's teacher: teacher.dtype, fast loading, the remembered checkpoint hash, the finished-store exit."""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
from torch.utils.data import DataLoader

from dho_pipeline.config import load_config
from dho_pipeline.data.shards import load_manifest
from dho_pipeline.data.teacher_views import TeacherViewBatches
from dho_pipeline.data.views import normalize
from dho_pipeline.store.lookup import find_store, view_recipe
from dho_pipeline.store.zarr_store import StoreError
from dho_pipeline.teacher.open_clip_teacher import _create_model, checkpoint_sha256, load_teacher
from stages import cache_teacher
from tests.conftest import write_config


def teacher_logits_on_views(cfg, manifest, dtype: str) -> torch.Tensor:
    cfg.teacher.dtype = dtype
    teacher = load_teacher(cfg.teacher, manifest.class_names, torch.device("cpu"))
    shards = manifest.splits["labelled"] + manifest.splits["unlabelled"]
    batches = DataLoader(TeacherViewBatches(shards, view_recipe(cfg), teacher.image_size, 256), batch_size=None)
    return torch.cat([teacher.logits(normalize(b["images"].flatten(0, 1), teacher.mean, teacher.std))
                      for b in batches])


def test_bf16_teacher_agrees_with_fp32(shards_dir, trained_teacher_file, tmp_path):
    cfg = load_config(write_config(tmp_path / "p.yaml", shards_dir, trained_teacher_file, views={"count": 8}))
    manifest = load_manifest(shards_dir)
    fp32 = teacher_logits_on_views(cfg, manifest, "fp32")
    bf16 = teacher_logits_on_views(cfg, manifest, "bf16")
    assert bf16.dtype == torch.float32  # logits stay fp32 whatever the tower runs in
    agreement = (fp32.argmax(1) == bf16.argmax(1)).float().mean().item()
    largest = (fp32 - bf16).abs().max().item()
    print(f"bf16 vs fp32 teacher on {len(fp32)} views: top-1 agreement {agreement:.4f}, "
          f"largest logit difference {largest:.3f} (logits span {fp32.min():.1f}..{fp32.max():.1f})")
    assert len(fp32) > 1000
    assert agreement >= 0.99


def test_dtype_enters_the_fingerprint(shards_dir, teacher_file, tmp_path):
    cfg = load_config(write_config(tmp_path / "p.yaml", shards_dir, teacher_file))
    names = load_manifest(shards_dir).class_names
    assert load_teacher(cfg.teacher, names, torch.device("cpu")).fingerprint["dtype"] == "fp32"  # auto on the CPU
    cfg.teacher.dtype = "bf16"
    teacher = load_teacher(cfg.teacher, names, torch.device("cpu"))
    assert teacher.fingerprint["dtype"] == "bf16"
    assert next(teacher.model.parameters()).dtype == torch.bfloat16 and teacher.classifier.dtype == torch.float32


def test_fast_loading_gives_the_checkpoint_exactly(shards_dir, teacher_file, tmp_path):
    """Skipped random init and a memory-mapped checkpoint: every parameter and buffer as open_clip's own loading."""
    cfg = load_config(write_config(tmp_path / "p.yaml", shards_dir, teacher_file))
    fast = _create_model(cfg.teacher, str(teacher_file), is_file=True, device=torch.device("cpu"))
    plain = open_clip.create_model(cfg.teacher.model, pretrained=str(teacher_file))
    fast_tensors = {**dict(fast.named_parameters()), **dict(fast.named_buffers())}
    plain_tensors = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    assert fast_tensors.keys() == plain_tensors.keys()
    for name, tensor in plain_tensors.items():
        assert torch.equal(fast_tensors[name], tensor), name
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5  # initialisers work again afterwards


def test_checkpoint_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"first weights")
    first = checkpoint_sha256(checkpoint)
    assert (tmp_path / "weights.pt.sha256.json").is_file()

    def must_not_hash(path):
        raise AssertionError("hashed again")

    monkeypatch.setattr("dho_pipeline.teacher.open_clip_teacher.sha256_file", must_not_hash)
    assert checkpoint_sha256(checkpoint) == first
    monkeypatch.undo()
    checkpoint.write_bytes(b"other weights")  # same size, another mtime
    os.utime(checkpoint, ns=(1, 1))
    assert checkpoint_sha256(checkpoint) not in (first, None)


def test_rerun_of_a_finished_store_does_not_build_the_teacher(cached_store, shards_dir, teacher_file, tmp_path,
                                                              monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was built")

    monkeypatch.setattr(cache_teacher, "load_teacher", must_not_load)
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file)
    for overrides in ([f"cache.store={cached_store}"], [f"cache.root={cached_store.parent}", "teacher.batch_size=8"]):
        report = cache_teacher.run(load_config(config, overrides))
        assert report.already_complete and report.path == cached_store
        assert "already complete" in report.summary()
    with pytest.raises(AssertionError, match="the teacher was built"):  # another request builds it
        cache_teacher.run(load_config(config, [f"cache.store={cached_store}", "views.seed=1"]))


def test_stores_of_two_dtypes_are_told_apart_by_stage_two(shards_dir, teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file)
    paths = {dtype: cache_teacher.run(load_config(config, [f"teacher.dtype={dtype}"])).path
             for dtype in ("fp32", "bf16")}
    manifest = load_manifest(shards_dir)
    with pytest.raises(StoreError, match="they differ in teacher.dtype.*or teacher.dtype"):
        find_store(load_config(config), manifest)
    for dtype, path in paths.items():
        assert find_store(load_config(config, [f"teacher.dtype={dtype}"]), manifest).path == path
