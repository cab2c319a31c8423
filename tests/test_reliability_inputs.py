"""Bad input is refused in one line naming the culprit, before anything is written: image folders, teacher files."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dho_pipeline.cli import main
from dho_pipeline.config import ConfigError, StudentConfig
from dho_pipeline.data.samples import parse_sample
from dho_pipeline.data.shards import MANIFEST_FORMAT, ShardDataError, iter_shard, load_manifest
from dho_pipeline.data.sources import BadImage, check_image
from dho_pipeline.student.model import build_student
from tests.conftest import one_line_error, write_config

pytestmark = pytest.mark.reliability


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    """An ImageFolder source under root/train with `counts[name]` small PNGs in each class folder."""
    for name, count in counts.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), color=i * 40).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("leftover", [None, "notes.txt"], ids=["empty", "no-image-files"])
def test_a_class_folder_without_images_is_named_and_nothing_is_written(tmp_path, leftover):
    source = image_folder(tmp_path / "src", {"bag": 3, "coat": 0, "shirt": 3})
    if leftover:
        (source / "train" / "coat" / leftover).write_text("not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["make-shards", str(source), str(out), "--shots", "1"])
    one_line_error(result, str(source / "train" / "coat"))
    assert not out.exists(), "nothing may be written: no manifest, no shards"


def test_more_shots_than_a_class_has_names_the_class_not_its_index(tmp_path):
    source = image_folder(tmp_path / "src", {"bag": 1, "coat": 3})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["make-shards", str(source), str(out), "--shots", "2"])
    one_line_error(result, "class 'bag'", "2 labelled images asked for, only 1 available")
    assert "class 0" not in result.output
    assert not out.exists(), "nothing may be written: no manifest, no shards"


def test_files_that_are_not_images_are_named_and_nothing_is_written(tmp_path):
    source = image_folder(tmp_path / "src", {"bag": 6, "coat": 6})
    (source / "train" / "coat" / "broken.png").write_text("garbage\n")
    png = (source / "train" / "bag" / "0.png").read_bytes()
    (source / "train" / "bag" / "cut.png").write_bytes(png[: len(png) // 2])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["make-shards", str(source), str(out), "--shots", "1", "--shard-size", "2"])
    one_line_error(result, "2 source files", str(source / "train" / "coat" / "broken.png"),
                   str(source / "train" / "bag" / "cut.png"), "nothing written")
    assert not out.exists(), "no shard may be left behind: the shards written before the bad file are removed"
    (source / "train" / "coat" / "broken.png").unlink()
    (source / "train" / "bag" / "cut.png").unlink()
    result = CliRunner().invoke(main, ["make-shards", str(source), str(out), "--shots", "1", "--shard-size", "2"])
    assert result.exit_code == 0, result.output


def test_an_image_only_a_full_decode_finds_bad_is_named_by_its_source_file(tmp_path):
    source = image_folder(tmp_path / "src", {"bag": 2, "coat": 2})
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(jpeg, format="JPEG")
    data = jpeg.getvalue()
    (source / "train" / "coat" / "cut.jpg").write_bytes(data[: len(data) // 2])  # header whole, data cut
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["make-shards", str(source), str(out), "--shots", "1"]).exit_code == 0
    manifest = load_manifest(out)
    with pytest.raises(ShardDataError, match=r"read by make-shards from .*/src/train/coat/cut\.jpg\): cannot decode"):
        for shard in manifest.shards():
            for position, raw in enumerate(iter_shard(shard)):
                parse_sample(raw, shard, position, skip_bad=False)


def test_cache_inspect_names_a_skipped_bad_image_by_its_source_file(tmp_path, teacher_file, shards_dir):
    source = image_folder(tmp_path / "src", {"bag": 2, "coat": 2})
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(jpeg, format="JPEG")
    cut = source / "train" / "coat" / "cut.jpg"
    cut.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])  # passes make-shards, fails the decode
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["make-shards", str(source), str(out), "--shots", "1"]).exit_code == 0
    config = write_config(tmp_path / "p.yaml", out, teacher_file, data={"on_bad_image": "skip", "num_workers": 0})
    cached = CliRunner().invoke(main, ["cache-teacher", "-c", str(config)])
    assert cached.exit_code == 0, cached.output
    store = next((tmp_path / "cache").glob("*.zarr"))
    assert f"1 bad image skipped (listed with their source files by `dho cache inspect {store} --shards {out}`)" in (
        cached.output)
    inspected = CliRunner().invoke(main, ["cache", "inspect", str(store), "--shards", str(out)])
    named = rf"bad image    \S+ sample '\d+'  from {re.escape(str(cut))}\n"
    assert re.search(named, inspected.output), inspected.output
    one_line_error(CliRunner().invoke(main, ["cache", "inspect", str(store), "--shards", str(shards_dir)]),
                   f"{shards_dir}: not the shard set {store} was made from")


def not_a_checkpoint(kind: str, folder: Path, teacher_file: Path) -> Path:
    """A file where a checkpoint of dho-tiny-clip should be: text, unrelated tensors, or a cut-off real one."""
    path = folder / f"{kind}.pt"
    if kind == "text":
        path.write_text("model weights go here\n")
    elif kind == "unrelated-tensors":
        torch.save({"encoder.weight": torch.zeros(4, 4), "encoder.bias": torch.zeros(4)}, path)
    else:
        data = teacher_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(("kind", "reason"), [
    ("text", "neither a zip archive nor a pickle"),
    ("unrelated-tensors", "weights do not fit the model"),
    ("truncated", "cannot be read as a state dict"),
], ids=["text", "unrelated-tensors", "truncated"])
def test_a_teacher_file_that_is_not_a_checkpoint_of_the_model_is_named_in_one_line(
        kind, reason, tmp_path, shards_dir, teacher_file):
    bad = not_a_checkpoint(kind, tmp_path, teacher_file)
    config = write_config(tmp_path / "pipeline.yaml", shards_dir, bad)
    result = CliRunner().invoke(main, ["cache-teacher", "-c", str(config)])
    one_line_error(result, f"teacher.pretrained: {bad} is not a checkpoint of open_clip model 'dho-tiny-clip'",
                          reason)
    assert not (tmp_path / "cache").exists(), "no store may be created for a teacher that cannot load"


@pytest.mark.parametrize(("overrides", "says"), [
    (["teacher.model=ViT-Q-99"], "teacher.model: unknown open_clip model 'ViT-Q-99'"),
    (["teacher.templates=nope"], "teacher.templates: unknown template set 'nope' (known: aircraft,"),
    (["teacher.extra_templates=[x]"], "teacher.extra_templates: template 'x' must hold one '{}' for the class "
     "name (it has 0)"),
    (["teacher.extra_templates=['a {} of {}']"], "template 'a {} of {}' must hold one '{}' for the class name (it "
     "has 2: '', '')"),
    (["teacher.extra_templates=['a photo of a {{}}.']"], "template 'a photo of a {{}}.' must hold one '{}' for the "
     "class name (it has 0)"),  # a literal '{}' in every class's text
    (["teacher.extra_templates=['a {} {x']"], "template 'a {} {x' is no format string (expected '}' before end"),
    (["teacher.pretrained=openai"], "teacher.pretrained: 'openai' is no file (not at "),
    (["teacher.model=ViT-B-32", "teacher.pretrained=openai"], "teacher.pretrained: 'openai' is a hub tag that needs "
     "a download, which failed (OSError: Name or service not known); give a local checkpoint file"),
], ids=["model", "templates", "extra-templates", "two-slots", "escaped-slot", "open-brace", "unknown-tag",
     "tag-offline"])
def test_a_teacher_that_cannot_be_built_is_named_in_one_line(overrides, says, tmp_path, shards_dir, teacher_file,
                                                              monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    config = write_config(tmp_path / "pipeline.yaml", shards_dir, teacher_file)
    sets = [arg for override in overrides for arg in ("--set", override)]
    one_line_error(CliRunner().invoke(main, ["cache-teacher", "-c", str(config), *sets]), says)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("kind", "model", "says"), [
    ("timm", "resnt18", "student.model: unknown timm model 'resnt18'; did you mean resnet18,"),
    ("timm", "resnet9000", "student.model: unknown timm model 'resnet9000'"),
    ("open_clip", "ViT-Q-99", "student.model: unknown open_clip model 'ViT-Q-99'"),
])
def test_an_unknown_student_model_is_named_with_close_matches(kind, model, says):
    with pytest.raises(ConfigError) as error:
        build_student(StudentConfig(kind=kind, model=model), ["a", "b"])
    assert str(error.value).startswith(says), str(error.value)


def test_an_image_past_pils_pixel_limit_is_named_as_such(fmnist, monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 28x28 image is past twice this: PIL refuses it
    with pytest.raises(BadImage, match=r"shoe\.png: Image size \(784 pixels\) exceeds .*MAX_IMAGE_PIXELS"):
        check_image(fmnist.read(("test", 0))[0], tmp_path / "shoe.png")


def test_a_student_weights_file_of_another_model_is_refused_not_trained_from_random_init(tmp_path, teacher_file):
    import timm

    trained = timm.create_model("resnet10t", num_classes=7)
    torch.save(trained.state_dict(), tmp_path / "resnet10t.pth")  # with its classifier: dropped, as expected
    config = StudentConfig(model="resnet10t", pretrained_file="resnet10t.pth")
    student, _ = build_student(config, ["a", "b"], base=tmp_path)
    assert all(torch.equal(student.backbone.state_dict()[k], v) for k, v in trained.state_dict().items()
               if not k.startswith("fc."))

    levit = timm.create_model("levit_128s")  # a head of BatchNorms and Linears, left over whole
    torch.save(levit.state_dict(), tmp_path / "levit.pth")
    student, _ = build_student(StudentConfig(model="levit_128s", pretrained_file="levit.pth"), ["a", "b"],
                               base=tmp_path)
    assert torch.equal(student.backbone.stem.conv1.linear.weight, levit.stem.conv1.linear.weight)

    torch.save(timm.create_model("resnet14t").state_dict(), tmp_path / "resnet14t.pth")
    torch.save({**trained.state_dict(), "layer5.0.conv1.weight": torch.zeros(1)}, tmp_path / "deeper.pth")
    (tmp_path / "notes.txt").write_text("not weights")
    for file, says in [("resnet14t.pth", "does not fit timm resnet10t (size mismatch for layer1.0.conv1.weight"),
                       ("deeper.pth", "holds 1 weight it has not (e.g. layer5.0.conv1.weight)"),
                       (teacher_file, "lacks"),  # the tiny CLIP teacher: no key of a resnet, which timm would allow
                       ("notes.txt", "is no weights file timm reads")]:
        with pytest.raises(ConfigError, match=f"student.pretrained_file: .*{Path(file).name} .*{re.escape(says)}"):
            build_student(StudentConfig(model="resnet10t", pretrained_file=str(file)), ["a", "b"], base=tmp_path)
    with pytest.raises(ConfigError, match="student.pretrained_file: .*resnet10t.pth does not load into open_clip"):
        build_student(StudentConfig(kind="open_clip", model="dho-tiny-clip", pretrained_file="resnet10t.pth"),
                      ["a", "b"], base=tmp_path)


def test_a_16_bit_grey_png_decodes_to_its_top_8_bits_not_to_white(fmnist):
    from dho_pipeline.data.views import decode_image

    grey = np.array(Image.open(io.BytesIO(fmnist.read(("test", 0))[0])))  # a real 28x28 image
    wide = grey.astype(np.uint16) * 257  # the same picture at 16 bits: 0..65535
    for picture in (wide, grey):
        png = io.BytesIO()
        Image.fromarray(picture).save(png, format="PNG")
        decoded = decode_image(png.getvalue())
        assert decoded.dtype == torch.uint8 and decoded.shape == (3, 28, 28)
        assert all(torch.equal(channel, torch.from_numpy(grey)) for channel in decoded)


@pytest.mark.parametrize(("damage", "says"), [
    (lambda text: text[:300], "not a readable manifest (Expecting"),  # cut off
    (lambda text: text.replace(MANIFEST_FORMAT, "dho-shards/9"), "format 'dho-shards/9', expected"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "class_names"}),
     "the manifest lacks the field 'class_names'"),
], ids=["cut-off", "other-format", "no-classes"])
def test_a_damaged_manifest_is_named_in_one_line(damage, says, tmp_path, shards_dir, teacher_file):
    shards = Path(shutil.copytree(shards_dir, tmp_path / "shards"))
    (shards / "manifest.json").write_text(damage((shards / "manifest.json").read_text()))
    config = write_config(tmp_path / "pipeline.yaml", shards, teacher_file)
    for command in (["cache-teacher", "-c", str(config)], ["train-student", "-c", str(config)]):
        one_line_error(CliRunner().invoke(main, command), f"{shards / 'manifest.json'}: ", says)


@pytest.mark.parametrize("label", [10, -1])
def test_a_class_index_outside_the_manifests_classes_is_named(label, shards_dir):
    shard = load_manifest(shards_dir).shards()[0]
    raw = next(iter_shard(shard))
    parse_sample(raw, shard, 0, skip_bad=False)  # as written: fine
    with pytest.raises(ShardDataError, match=rf"{shard.path}: sample '{raw['__key__']}': class index {label}, "
                                             r"outside the 10 classes \(0-9\)"):
        parse_sample({**raw, "cls": str(label).encode()}, shard, 0, skip_bad=False)


def test_a_file_that_begins_as_a_jpeg_but_pil_cannot_identify_is_called_a_damaged_jpeg(fmnist, tmp_path):
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(fmnist.read(("test", 0))[0])).save(jpeg, format="JPEG")
    damaged = jpeg.getvalue()[:4] + bytes(200)  # the signature, then zeros where the header was
    with pytest.raises(BadImage, match=r"shoe\.jpg: a damaged JPEG \(it begins as one, but PIL cannot read its"):
        check_image(damaged, tmp_path / "shoe.jpg")
    with pytest.raises(BadImage, match=r"notes\.jpg: not an image in any format PIL reads \(it begins b'accuracy"):
        check_image(b"accuracy 0.83\n", tmp_path / "notes.jpg")
