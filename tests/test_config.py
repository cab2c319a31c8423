"""pipeline.yaml: the shipped example is valid and complete; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dho_pipeline.config import ConfigError, PipelineConfig, load_config
from stages.demo import QUICK, teacher_file

EXAMPLE = Path(__file__).parent.parent / "pipeline.yaml"


def test_example_sets_every_field():
    cfg = load_config(EXAMPLE)
    written = yaml.safe_load(EXAMPLE.read_text())
    assert set(written) == set(cfg.to_dict())
    for section, values in cfg.to_dict().items():
        assert set(written[section]) == set(values), f"pipeline.yaml section {section} is incomplete"
    assert cfg.eval.alpha_grid == PipelineConfig().eval.alpha_grid


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
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        load_config(EXAMPLE, [override])


def test_overrides_parse_yaml_values():
    cfg = load_config(EXAMPLE, ["train.lr=5e-4", "views.scale=[0.3, 1]", "train.grad_clip=null"])
    assert (cfg.train.lr, cfg.views.scale, cfg.train.grad_clip) == (5e-4, [0.3, 1.0], None)
