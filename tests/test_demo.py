"""`dho demo` end to end on a plan small enough for CI: results.json, the table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from stages.demo import METHODS, DemoPlan, Setting, TeacherRecipe, results_table, run

TINY = DemoPlan(
    settings=(Setting("4-shot", shots=4),
              Setting("4-shot Tip-Adapter", shots=4, teacher_kind="tip-adapter", methods=("dho",), steps=3, views=3)),
    teachers={"strong": TeacherRecipe(500, 1, batch_size=64)},
    teacher_pool=500, unlabelled_per_class=12, val_per_class=5, test_per_class=5, steps=4, views=2,
    extra={"data": {"num_workers": 0}, "train": {"batch_labelled": 8, "batch_unlabelled": 8}},
)


def test_tiny_demo_runs_every_method_and_writes_the_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    results = run(Path(tmp_path.name), TINY, log=lambda *_: None)  # relative, as `dho demo --out demo-out`
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    few_shot, adapted = saved["settings"]["4-shot"], saved["settings"]["4-shot Tip-Adapter"]
    assert set(few_shot["accuracy"]) == {"teacher", *METHODS}
    assert set(adapted["accuracy"]) == {"teacher", "dho"} and adapted["teacher_kind"] == "tip-adapter"
    assert few_shot["labelled_images"] == 40 and few_shot["unlabelled_images"] == 80
    assert all(0.0 <= a <= 1.0 for s in saved["settings"].values() for a in s["accuracy"].values())
    assert {"teacher_pretraining_strong_s", "4-shot/cache_teacher_s", "4-shot/dho_online/seed0_s",
            "total_s"} <= set(saved["timings"])
    assert (few_shot["steps"], few_shot["views"], adapted["steps"], adapted["views"]) == (4, 2, 3, 3)
    adapted_config = yaml.safe_load((tmp_path / "4-shot-Tip-Adapter" / "pipeline.yaml").read_text())
    assert (adapted_config["train"]["steps"], adapted_config["views"]["count"]) == (3, 3)
    table = (tmp_path / "results.md").read_text()
    assert table == results_table(saved) and "| 4-shot Tip-Adapter | 40 | 3 |" in table and "—" in table
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(tmp_path.glob("shards/*"))) == 1, "settings with one label budget share their shards"
