"""benchmarks/clip_student.py: the summary, the table and the plot on made-up runs (the runs themselves go
through the stages, which their own tests cover; a real run takes many minutes)."""

from __future__ import annotations

import json

from benchmarks.clip_student import Setup, parse_args, write_outputs


def fake_results() -> dict:
    runs = []
    for budget, base in {"1%": 0.80, "10%": 0.85}.items():
        for method, lift in {"ce_only": -0.05, "single_head_kd": 0.0, "dho": 0.01}.items():
            for seed in (0, 1):
                curve = [[e, base + lift - 0.01 * (3 - e), base + lift, base + lift + 0.002 * (e - 3)]
                         for e in (1, 2, 3)]
                runs.append({"budget": budget, "method": method, "seed": seed, "test": base + lift + 0.004 * seed,
                             "val": base, "alpha": 0.5 if method == "dho" else None, "train_s": 10.0,
                             "resumed_from_step": 0, "val_curve": curve})
    setup = {"budgets": ["1%", "10%"], "methods": ["ce_only", "single_head_kd", "dho"], "seeds": [0, 1],
             "epochs": 3, "lr": 1e-3, "pool_images": 10000, "test_images": 10000,
             "labelled_images": {"1%": 100, "10%": 1000}}
    return {"setup": setup, "runs": runs, "zero_shot": {"student": 0.72, "teacher": 0.88}}


def test_summary_table_and_plot(tmp_path):
    write_outputs(fake_results(), tmp_path / "cs.json")
    saved = json.loads((tmp_path / "cs.json").read_text())
    dho = saved["summary"]["10%"]["dho"]
    assert (round(dho["mean"], 3), dho["seeds"]) == (0.862, [0, 1])
    # DHO deploys the default mix (column 3), one-head methods the CE head (column 1); last third = 1 epoch.
    assert round(dho["val_gain_last_third"], 4) == 0.002
    assert round(saved["summary"]["1%"]["ce_only"]["val_gain_last_third"], 4) == 0.01
    table = (tmp_path / "cs.md").read_text()
    assert "| 10% | 1,000 | 0.802 ±0.002 | 0.852 ±0.002 | 0.862 ±0.002 | +1.0 pts (largest seed spread 0.4) |" in table
    assert "student CLIP 0.720, the teacher 0.880" in table
    assert (tmp_path / "cs.png").read_bytes()[:4] == b"\x89PNG"


def test_smoke_flags_name_their_own_folder():
    args = parse_args(["--epochs", "1", "--seeds", "0", "--pool-per-class", "100", "--test-per-class", "100"])
    assert (args.epochs, args.seeds, args.methods) == (1, [0], ["ce_only", "single_head_kd", "dho"])
    smoke = Setup(pool_per_class=100, test_per_class=100, epochs=1)
    assert smoke.name == "pool100pc-test100-1ep-lr0.001" != Setup().name
