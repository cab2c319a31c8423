"""dho export: the exported model predicts what `dho predict` does; safetensors loads in timm; bad input is one line."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.data.views import normalize
from dho_pipeline.student.from_checkpoint import load_student
from dho_pipeline.student.predict import clean_views
from stages import train_student
from tests.conftest import one_line_error
from tests.test_stage_two import train_config

TEST_IMAGES = 6
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # we test that format


@pytest.fixture(scope="module")
def dho_run(cached_store, shards_dir, teacher_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export-dho")
    return train_student.run(load_config(train_config(folder, shards_dir, teacher_file, cached_store, steps=8)))


@pytest.fixture(scope="module")
def test_images(fmnist, tmp_path_factory) -> list[Path]:
    """The first Fashion-MNIST test images, as PNG files."""
    folder = tmp_path_factory.mktemp("test-images")
    paths = [folder / f"test-{i}.png" for i in range(TEST_IMAGES)]
    for i, path in enumerate(paths):
        path.write_bytes(fmnist.read(("test", i))[0])
    return paths


def export(checkpoint: Path, fmt: str, out: Path, *args: str) -> dict:
    """Run `dho export`; the description it wrote beside `out`."""
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--format", fmt, "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads(out.with_name(out.name + ".json").read_text())


def run_exported(fmt: str, path: Path, images: torch.Tensor) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], {"images": images.numpy()})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(images).numpy()


def embedded_description(fmt: str, path: Path) -> dict:
    """The description an ONNX or TorchScript file carries in its metadata."""
    if fmt == "onnx":
        import onnx

        return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["dho"])
    extra = {"dho.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["dho.json"])


def described_inputs(description: dict, images: list[Path]) -> torch.Tensor:
    """The images preprocessed as the description says: clean view at image_size, normalised by its mean and std."""
    return normalize(clean_views(images, description["image_size"]), description["mean"], description["std"])


def predicted(checkpoint: Path, images: list[Path]) -> np.ndarray:
    """`dho predict`'s probability of every class for each image, in class-index order."""
    result = CliRunner().invoke(main, ["predict", str(checkpoint), *map(str, images), "--top-k", "10", "--json"])
    assert result.exit_code == 0, result.output
    names = torch.load(checkpoint, weights_only=False)["class_names"]
    tops = json.loads(result.output)
    return np.array([[dict(tops[str(image)])[name] for name in names] for image in images])


def check_exports_predict_as_dho_predict(run: Path, formats: list[str], images: list[Path], folder: Path) -> dict:
    """Export `run` in each format; each file's probabilities on `images` are `dho predict`'s. The descriptions."""
    final = torch.load(run / "final.pt", weights_only=False)
    expected = predicted(run / "final.pt", images)
    descriptions = {}
    for fmt in formats:
        out = folder / f"student.{fmt}"
        description = descriptions[fmt] = export(run / "final.pt", fmt, out)
        assert (description["alpha"], description["beta"]) == (final["alpha"], final["beta"])
        assert description["class_names"] == final["class_names"] and description["method"] == final["method"]
        assert description["model"] == final["config"]["student"]["model"]
        assert description["image_size"] == final["student_data"]["image_size"]
        assert embedded_description(fmt, out) == description
        probabilities = run_exported(fmt, out, described_inputs(description, images))
        assert probabilities.shape == (len(images), 10)
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0, err_msg=fmt)
    return descriptions


def test_exported_model_predicts_as_dho_predict(dho_run, test_images, tmp_path):
    for description in check_exports_predict_as_dho_predict(dho_run, ["onnx", "torchscript"], test_images,
                                                             tmp_path).values():
        assert description["head"] == "combined" and description["input"]["shape"] == ["batch", 3, 32, 32]


@pytest.mark.parametrize(("head", "fmt"), [("ce", "torchscript"), ("kd", "onnx")])
def test_one_head_exports_its_own_softmax(head, fmt, dho_run, test_images, tmp_path):
    description = export(dho_run / "final.pt", fmt, tmp_path / "head", "--head", head)
    images = described_inputs(description, test_images)
    student = load_student(dho_run / "final.pt", torch.device("cpu"))
    with torch.no_grad():
        ce, kd = student.model(images)
    expected = (ce if head == "ce" else kd).softmax(-1).numpy()
    np.testing.assert_allclose(run_exported(fmt, tmp_path / "head", images), expected, atol=1e-5, rtol=0)
    assert description["head"] == head


def test_safetensors_backbone_loads_in_timm_and_holds_both_heads(dho_run, test_images, tmp_path):
    out = tmp_path / "student.safetensors"
    umask = os.umask(0o022)
    try:
        description = export(dho_run / "final.pt", "safetensors", out)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644, "the umask's mode, as the other formats (not save_file's 0600)"
    backbone = timm.create_model(description["model"], pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(out), **description["data_config"])).eval()
    student = load_student(dho_run / "final.pt", torch.device("cpu"))
    images = described_inputs(description, test_images)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), student.model.backbone(images), atol=1e-6, rtol=0)
    data = timm.data.resolve_model_data_config(backbone)
    assert tuple(data["input_size"]) == (3, student.data.image_size, student.data.image_size)
    assert tuple(data["mean"]) == tuple(student.data.mean) and tuple(data["std"]) == tuple(student.data.std)

    state = student.model.state_dict()
    assert description["heads"] == {"ce_head": ["ce_head.weight", "ce_head.bias"],
                                    "kd_head": ["kd_head.weight", "kd_head.bias"]}
    with safe_open(str(out), "pt") as f:
        for name in [*description["heads"]["ce_head"], *description["heads"]["kd_head"]]:
            assert torch.equal(f.get_tensor(name), state[name])
        assert len(f.keys()) == len(state)
        metadata = f.metadata()
    assert metadata["model"] == "resnet10t" and json.loads(metadata["data_config"]) == description["data_config"]
    assert json.loads(metadata["class_names"]) == student.class_names
    assert json.loads(metadata["alpha"]) == student.alpha


def test_an_open_clip_student_exports_to_onnx_and_torchscript(cached_store, shards_dir, teacher_file, test_images,
                                                              tmp_path, capsys):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=2)
    student = f"student.kind=open_clip student.model=dho-tiny-clip student.pretrained_file={teacher_file}"
    run = train_student.run(load_config(config, student.split()))
    assert "student.pretrained_file" not in capsys.readouterr().err  # its weights given: no warning
    for description in check_exports_predict_as_dho_predict(run, ["onnx", "torchscript"], test_images,
                                                             tmp_path).values():
        assert description["model_kind"] == "open_clip"
    result = CliRunner().invoke(main, ["export", str(run / "final.pt"), "--format", "safetensors",
                                       "--out", str(tmp_path / "clip.safetensors")])
    one_line_error(result, str(run / "final.pt"), "timm students")


def test_an_open_clip_student_without_its_weights_is_warned_about(cached_store, shards_dir, teacher_file, tmp_path,
                                                                 capsys):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=1)
    train_student.run(load_config(config, ["student.kind=open_clip", "student.model=dho-tiny-clip"]))
    assert ("warning: student.kind open_clip without student.pretrained_file: the dho-tiny-clip image tower starts "
            "random") in capsys.readouterr().err


@pytest.mark.reliability
def test_bad_export_requests_are_one_line_naming_the_culprit(dho_run, tmp_path, monkeypatch):
    def dho_export(checkpoint: Path, *args: str):
        return CliRunner().invoke(main, ["export", str(checkpoint), *args])

    out = str(tmp_path / "student.onnx")
    one_line_error(dho_export(dho_run / "last.pt", "--format", "onnx", "--out", out), str(dho_run / "last.pt"),
                   f"use the run's final.pt ({dho_run / 'final.pt'})")
    missing = tmp_path / "no-such-folder"
    one_line_error(dho_export(dho_run / "final.pt", "--format", "onnx", "--out", str(missing / "s.onnx")),
                   str(missing))
    unknown = dho_export(dho_run / "final.pt", "--format", "tflite", "--out", out)
    assert unknown.exit_code == 2 and "'tflite' is not one of 'onnx', 'torchscript', 'safetensors'" in unknown.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    one_line_error(dho_export(dho_run / "final.pt", "--format", "onnx", "--out", out), "onnxruntime",
                   "pip install -e '.[export]'")
    assert not Path(out).exists()
