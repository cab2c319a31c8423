"""pipeline.yaml: the shipped example is valid and complete; bad values are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dho_pipeline.config import ConfigError, PipelineConfig, ViewConfig, load_config
from stages.demo import QUICK, teacher_file

EXAMPLE = Path(__file__).parent.parent / "pipeline.yaml"


def test_example_sets_every_field():
    cfg = load_config(EXAMPLE)
    written = yaml.safe_load(EXAMPLE.read_text())
    assert set(written) == set(cfg.to_dict())
    for section, values in cfg.to_dict().items():
        assert set(written[section]) == set(values), f"pipeline.yaml section {section} is incomplete"
    assert cfg.eval.alpha_grid == PipelineConfig().eval.alpha_grid


def test_example_views_are_the_defaults_so_its_stores_match_a_minimal_config():
    assert load_config(EXAMPLE).views == ViewConfig()


def test_example_teacher_is_the_file_the_quick_demo_writes():
    quick_teacher = teacher_file(Path("demo-out"), "strong", QUICK.teachers["strong"])
    assert load_config(EXAMPLE).teacher.pretrained == str(quick_teacher)


@pytest.mark.parametrize("override, field", [
    ("train.lr=fast", "train.lr"),
    ("train.lrr=1", "train.lrr"),
    ("teacher.mode=remote", "teacher.mode"),
    ("views.scale=[0.5]", "views.scale"),
    ("views.count=0", "views.count"),
    ("student=3", "student"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.steps=-5", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("train.epochs=0", "train.epochs"),
    ("train.warmup=-0.1", "train.warmup"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.seed=-1", "train.seed"),
    ("train.device=gpu", "train.device"),
    ("train.device=cuda:x", "train.device"),
    ("data.num_workers=-1", "data.num_workers"),
    ("views.seed=-1", "views.seed"),
    ("views.ratio=[1.5, 0.5]", "views.ratio"),
    ("teacher.adapter.lr=0", "teacher.adapter.lr"),
    ("teacher.adapter.epochs=0", "teacher.adapter.epochs"),
    ("teacher.image_std=[0.5, 0, 0.5]", "teacher.image_std"),
    ("student.image_mean=[0.5]", "student.image_mean"),
    ("student.image_size=0", "student.image_size"),
    ("eval.alpha_grid=[]", "eval.alpha_grid"),
    ("eval.beta_grid=[0, 1]", "eval.beta_grid"),
    ("eval.batch_size=0", "eval.batch_size"),
])
def test_bad_values_name_the_field(override, field, tmp_path):
    keys, value = override.split("=", 1)
    doc: dict = {}
    node = doc
    for k in keys.split(".")[:-1]:
        node = node.setdefault(k, {})
    node[keys.split(".")[-1]] = yaml.safe_load(value)
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: {field}:"):
        load_config(config)
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: "):
        load_config(EXAMPLE, [override])


def test_a_range_error_quotes_the_value_and_what_is_accepted():
    with pytest.raises(ConfigError, match=r"^--set train.lr=-1: must be > 0, got -1.0$"):
        load_config(EXAMPLE, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"^--set train.device=gpu: must be one of auto, cpu, cuda, cuda:N, xpu, "
                                          r"xpu:N or mps, got 'gpu'$"):
        load_config(EXAMPLE, ["train.device=gpu"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_every_device_form_is_accepted(device):
    assert load_config(EXAMPLE, [f"train.device={device}"]).train.device == device


def test_overrides_parse_yaml_values():
    cfg = load_config(EXAMPLE, ["train.lr=5e-4", "views.scale=[0.3, 1]", "train.grad_clip=null"])
    assert (cfg.train.lr, cfg.views.scale, cfg.train.grad_clip) == (5e-4, [0.3, 1.0], None)


def test_a_set_path_found_only_from_the_current_folder_says_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ux" / "shards" / "again").mkdir(parents=True)
    config = tmp_path / "ux" / "pipeline.yaml"
    config.write_text("train:\n  lr: 0.001\n")
    assert load_config(Path("ux/pipeline.yaml"), ["data.shards=shards/again"]).data.shards == "shards/again"
    with pytest.raises(ConfigError, match=rf"^--set data.shards=ux/shards/again: paths are relative to the config's "
                                          rf"folder, so this is {tmp_path}/ux/ux/shards/again, which is not there; "
                                          rf"for the one in the current folder give {tmp_path}/ux/shards/again$"):
        load_config(Path("ux/pipeline.yaml"), ["data.shards=ux/shards/again"])


@pytest.mark.parametrize("overrides, message", [
    (["train.stpes=3"], "--set train.stpes=3: unknown field (did you mean train.steps? known: amp,"),
    (["train.xyz=3"], "--set train.xyz=3: unknown field (known: amp,"),  # nothing close: no guess
    (["train=3", "train.out_dir=x"], "--set train=3: expected a mapping, got 3"),
    (["data.shards=x", "data.shards.y=1"], "--set data.shards.y=1: data.shards is a value, not a section"),
    (["train.lr=1", "train={lr: -1}"], "--set train={lr: -1}: train.lr: must be > 0, got -1.0"),
    (["views.scale=[0.5, x]"], "--set views.scale=[0.5, x]: views.scale[1]: expected a number, got 'x'"),
    (["train.lr=[1"], "--set train.lr=[1: not valid YAML: while parsing a flow sequence; expected ',' or ']'"),
    (["trian.lr=3"], "--set trian.lr=3: trian: unknown field (did you mean train? known: cache,"),  # a mistyped section
    (["views.ratio.x=1"], "--set views.ratio.x=1: views.ratio"),
    (["train.epochs=.inf"], "--set train.epochs=.inf: expected a finite number, got inf"),
    (["views.ratio=[0.75, .inf]"], "--set views.ratio=[0.75, .inf]: views.ratio[1]: expected a finite number"),
    (["train.grad_clip=.nan"], "--set train.grad_clip=.nan: expected a finite number, got nan"),
])
@pytest.mark.parametrize("config", [EXAMPLE, None], ids=["file", "defaults"])
def test_a_bad_set_is_named_not_the_config_file(config, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(config, overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_bad_yaml_is_named_by_file_and_line(tmp_path):
    config = tmp_path / "b4.yaml"
    config.write_text("train:\n  lr: 1\n  out_dir: x: y\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}, line 3, column 13: not valid YAML: mapping "
                                          "values are not allowed here$"):
        load_config(config)


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    config = tmp_path / "windows.yaml"
    config.write_text("train:\n  lr: 0.001\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: not UTF-8 text \(byte 0: b'\\xff'\); save"):
        load_config(config)
