"""Top-k stores (cache.top_k): the k largest logits, their classes and the log-sum-exp per view, and KD from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.store.zarr_store import TOPK_STORE_FORMAT, TeacherStore
from dho_pipeline.student.losses import TopKLogits, kd_loss
from stages import cache_teacher, train_student
from tests.conftest import one_line_error, write_config

STUDENT = {"model": "resnet10t", "image_size": 32}


def top_k_of(teacher: torch.Tensor, k: int) -> TopKLogits:
    top = teacher.topk(k, dim=-1)
    return TopKLogits(top.values, top.indices, teacher.logsumexp(-1))


def test_topk_kd_with_every_class_is_the_dense_kd():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10, requires_grad=True), 4 * torch.randn(16, 10)
    dense = kd_loss(student, teacher, 2.0)
    sparse = kd_loss(student, top_k_of(teacher, 10), 2.0)
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(torch.autograd.grad(sparse, student)[0], torch.autograd.grad(dense, student)[0])


def test_topk_kd_is_the_kl_over_the_k_classes_and_the_rest():
    """By hand for one row: teacher p = softmax(z) at T = 1 in buckets (top 2, rest), tempered, against the
    student's buckets."""
    z, s, temperature = torch.tensor([[3.0, 1.0, 0.5, -1.0]]), torch.tensor([[0.2, 0.4, -0.3, 1.0]]), 2.0
    p, q = z.softmax(-1)[0], s.softmax(-1)[0]
    p_buckets = torch.stack([p[0], p[1], p[2] + p[3]])
    q_buckets = torch.stack([q[0], q[1], q[2] + q[3]])
    pt = p_buckets ** (1 / temperature) / (p_buckets ** (1 / temperature)).sum()
    qt = q_buckets ** (1 / temperature) / (q_buckets ** (1 / temperature)).sum()
    expected = temperature**2 * (pt * (pt / qt).log()).sum()
    torch.testing.assert_close(kd_loss(s, top_k_of(z, 2), temperature), expected)


def test_topk_kd_stays_finite_when_the_rest_mass_underflows():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    teacher[:, 3] = 300.0  # every other class below float precision
    loss = kd_loss(student, top_k_of(teacher, 2), 2.0)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, student)[0]).all()


@pytest.fixture(scope="module")
def topk_store(shards_dir, teacher_file, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("topk") / "p.yaml", shards_dir, teacher_file, cache={"top_k": 3})
    return config, cache_teacher.run(load_config(config)).path


def test_topk_store_holds_the_dense_stores_top_k(topk_store, cached_store):
    _, path = topk_store
    top, dense = TeacherStore.open(path), TeacherStore.open(cached_store)
    assert top.attrs["format"] == TOPK_STORE_FORMAT and top.fingerprint["top_k"] == 3 and top.top_k == 3
    assert "logits" not in top.group and "top_k" not in dense.fingerprint
    assert top.missing_chunk_files() == {} == dense.missing_chunk_files(), "cache list: no shard flagged damaged"
    for store, says in ((path, "classes=10 top-k=3 views=4"), (cached_store, "classes=10 logits=all views=4")):
        listed = CliRunner().invoke(main, ["cache", "list", "--root", str(store.parent)]).output
        assert says in next(line for line in listed.splitlines() if line.startswith(str(store))), listed
    for shard in top.shards():
        rows, reference = top.read_shard(shard), dense.read_shard(shard)
        computed = ~np.isnan(reference.logits).any(-1)
        logits = reference.logits.astype(np.float32)
        expected = -np.sort(-logits, axis=-1)[..., :3]
        np.testing.assert_allclose(rows.top_values[computed].astype(np.float32), expected[computed], atol=0.05)
        np.testing.assert_allclose(rows.lse[computed], torch.from_numpy(logits[computed]).logsumexp(-1).numpy(),
                                   atol=0.05)
        agree = rows.predictions()[computed] == reference.predictions()[computed]  # fp16 ties may swap a few
        assert agree.mean() >= 0.98
        assert (rows.top_indices[~computed] == -1).all()


def test_student_trains_from_a_topk_store_and_evaluate_reads_it(topk_store, shards_dir, teacher_file, tmp_path):
    config, path = topk_store
    run_dir = tmp_path / "run"
    train = {"steps": 6, "batch_labelled": 8, "batch_unlabelled": 16, "log_every": 2, "checkpoint_every": 6,
             "out_dir": str(run_dir)}
    config = write_config(tmp_path / "t.yaml", shards_dir, teacher_file, student=STUDENT, train=train,
                          cache={"store": str(path), "top_k": 3})
    train_student.run(load_config(config))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["kd_u"]) and m["kd_u"] > 0 for m in metrics if "kd_u" in m)
    result = CliRunner().invoke(main, ["cache", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dtype"].startswith("top-3") and report["bytes_per_view"] > 0
    assert report["teacher_accuracy"]["test"] is not None


def test_a_top_k_above_the_number_of_classes_is_refused_before_any_store_is_made(shards_dir, teacher_file, tmp_path):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"top_k": 11})
    result = CliRunner().invoke(main, ["cache-teacher", "-c", str(config)])
    one_line_error(result, "cache.top_k: 11, but the shards have 10 classes: set it at most 10, or null")
    assert not (tmp_path / "cache").exists()
