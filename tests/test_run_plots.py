"""dho plot: loss and val curves of several real runs side by side, labelled by method and seed."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.run_plots import draw_runs, read_run
from stages import train_student
from tests.conftest import one_line_error
from tests.test_stage_two import train_config


def test_plot_draws_loss_and_val_curves_of_each_run(cached_store, shards_dir, teacher_file, tmp_path):
    # 120 unlabelled images, 30 a step: validation at steps 4 and 8
    runs = [train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, name, steps=8,
                                                       batch_unlabelled=30, method=method, seed=seed)))
            for name, method, seed in [("dho-run", "dho", 0), ("kd-run", "single_head_kd", 1)]]
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (2016, 456)

    fig = draw_runs([read_run(run) for run in runs])
    dho, kd = "dho seed 0 (dho-run)", "single_head_kd seed 1 (kd-run)"
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes] == [[dho, kd], [dho, kd], [dho], [dho]]
    records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    loss, val_ce = fig.axes[0].get_lines()[1], fig.axes[1].get_lines()[1]
    assert list(loss.get_xdata()) == [2, 4, 6, 8]
    assert list(loss.get_ydata()) == [r["loss"] for r in records if "loss" in r]
    assert list(val_ce.get_xdata()) == [4, 8]
    assert list(val_ce.get_ydata()) == [r["val"]["ce_head"] for r in records if "val" in r]


def test_plot_names_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tmp_path), "--out", str(tmp_path / "curves.png")])
    one_line_error(result, str(tmp_path), "no metrics.jsonl")
    assert not (tmp_path / "curves.png").exists()
