"""`dho demo` end to end on a plan small enough for CI: results.json, the table and the plot."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from benchmarks.demo_time import main as demo_time
from dho_pipeline.config import load_config
from dho_pipeline.errors import DhoError
from dho_pipeline.student.checkpoint import load_checkpoint
from stages import train_student
from stages.demo import METHOD_OVERRIDES, METHODS, DemoPlan, Setting, TeacherRecipe, results_table, run

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


def test_a_second_call_continues_the_first_and_retrain_trains_every_run_again(tmp_path, monkeypatch):
    plan = replace(TINY, settings=TINY.settings[:1], methods=("ce_only", "dho"))
    said: list[str] = []
    first = run(tmp_path, plan, log=said.append)
    assert first["reused"] == []
    runs = tmp_path / "4-shot" / "runs"
    overrides = [*METHOD_OVERRIDES["dho"], "train.seed=0", f"train.out_dir={runs / 'dho-seed0'}"]
    train_student.run(load_config(tmp_path / "4-shot" / "pipeline.yaml", overrides), overwrite=True, max_steps=2)
    assert load_checkpoint(runs / "dho-seed0" / "last.pt")["step"] == 2  # a run stopped half-way
    finished = (runs / "ce_only-seed0" / "final.pt").read_bytes()

    said.clear()
    again = run(tmp_path, plan, log=said.append)
    assert again["settings"] == first["settings"]  # the stopped run went on from step 2 to the same student
    assert {f"kept {runs / 'ce_only-seed0'}, finished by an earlier call",
            f"continued {runs / 'dho-seed0'} from the last.pt of an earlier call"} <= set(said), said
    assert (runs / "ce_only-seed0" / "final.pt").read_bytes() == finished  # kept as it was
    assert again["reused"] == ["teacher strong", "4-shot store", "4-shot/ce_only/seed0", "4-shot/dho/seed0"]
    assert set(again["timings"]) == {"total_s"}  # the reused work has no time in this call

    with pytest.raises(DhoError, match=r"4-shot shards of another demo plan \(test_per_class 5 -> 6\)"):
        run(tmp_path, replace(plan, test_per_class=6), log=said.append)  # other splits: never the old shards

    longer = run(tmp_path, replace(plan, steps=5), log=said.append)  # another plan: its runs train again
    assert f"training {runs / 'dho-seed0'} again: the plan changed since (train.steps 4 -> 5)" in said, said
    assert {"4-shot/ce_only/seed0_s", "4-shot/dho/seed0_s"} <= set(longer["timings"])
    assert load_checkpoint(runs / "dho-seed0" / "final.pt")["step"] == 5

    retrained = run(tmp_path, replace(plan, steps=5), log=said.append, retrain=True)
    assert {"4-shot/ce_only/seed0_s", "4-shot/dho/seed0_s"} <= set(retrained["timings"])
    assert retrained["reused"] == ["teacher strong", "4-shot store"]
    assert retrained["settings"] == longer["settings"]

    def stopped_at_once(*_args, **_kwargs):
        raise train_student.TrainingStopped("stopped at step 1: last.pt kept", signal.SIGINT)

    monkeypatch.setattr(train_student, "run", stopped_at_once)  # Ctrl-C in a retrain's first run
    with pytest.raises(train_student.TrainingStopped):
        run(tmp_path, replace(plan, steps=5), log=said.append, retrain=True)
    assert not list(runs.glob("*/*.pt")), "an earlier run left for the next call to keep as this plan's"


def test_demo_time_refuses_a_results_file_that_reused_an_earlier_calls_work(tmp_path):
    whole = {"timings": {"teacher_pretraining_strong_s": 100.0, "4-shot/cache_teacher_s": 10.0, "total_s": 150.0},
             "reused": []}
    continued = {"timings": {"total_s": 20.0}, "reused": ["teacher strong", "4-shot store"]}
    files = {}
    for name, result in {"whole": whole, "slower": {**whole, "timings": {k: 2 * v for k, v in
                                                                        whole["timings"].items()}},
                         "continued": continued}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(result))
    compared = CliRunner().invoke(demo_time, [str(files["slower"]), str(files["whole"])])
    assert compared.exit_code == 0 and json.loads(compared.output)["new_machine_slowdown"] == 2.0, compared.output
    refused = CliRunner().invoke(demo_time, [str(files["continued"]), str(files["whole"])])
    assert refused.exit_code == 2
    assert f"{files['continued']} reused an earlier call's teacher strong, 4-shot store" in refused.output
