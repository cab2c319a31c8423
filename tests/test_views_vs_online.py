"""benchmarks/views_vs_online.py: the summary, the smallest-K line, the table and the plot on made-up runs
(the runs themselves go through the stages, which their own tests cover; a real run takes minutes)."""

from __future__ import annotations

import json

from benchmarks.views_vs_online import parse_args, write_outputs


def fake_results() -> dict:
    runs = []
    for method, scores in {"dho": {1: 0.80, 2: 0.84, 4: 0.858, None: 0.86},
                           "single_head_kd": {1: 0.79, 2: 0.82, 4: 0.85, None: 0.86}}.items():
        for k, score in scores.items():
            for seed in (0, 1):
                runs.append({"method": method, "k": k, "seed": seed, "test": score + 0.002 * seed, "val": score,
                             "train_s": 10.0 + (k is None), "resumed_from_step": 0, "images_per_s": 500.0})
    stage_one = {str(k): {"k": k, "seconds": 2.0 * k, "resumed": False, "bytes_on_disk": 1000 * k,
                          "teacher_test": 0.879} for k in (1, 2, 4)}
    setup = {"ks": [1, 2, 4], "seeds": [0, 1], "methods": ["dho", "single_head_kd"], "shots": 16, "epochs": 30,
             "labelled_images": 160, "unlabelled_images": 2000, "test_images": 10000, "steps": 960, "batch": 64}
    return {"setup": setup, "stage_one": stage_one, "runs": runs}


def test_summary_smallest_k_table_and_plot(tmp_path):
    results = fake_results()
    write_outputs(results, tmp_path / "vvo.json")
    saved = json.loads((tmp_path / "vvo.json").read_text())
    assert saved["smallest_k"] == {"dho": 4, "single_head_kd": None}  # 0.859 vs 0.861: within 0.3 points
    online = saved["summary"]["dho"]["online"]
    assert (online["min"], online["max"], online["train_s_mean"]) == (0.86, 0.862, 11.0)
    table = (tmp_path / "vvo.md").read_text()
    assert "| 4 | 3.9 KiB | 8.0 | 0.859 ±0.001 | 10 | 0.851 ±0.001 | 10 |" in table
    assert "| online, fresh views | — | — | 0.861 ±0.001 | 11 | 0.861 ±0.001 | 11 |" in table
    assert "dho: K=4" in table and "single_head_kd: none of K = 1, 2, 4 (best K=4" in table
    assert (tmp_path / "vvo.png").read_bytes()[:4] == b"\x89PNG"


def test_smoke_flags():
    args = parse_args(["--ks", "1", "2", "--seeds", "0", "--epochs", "1", "--pool", "200"])
    assert (args.ks, args.seeds, args.epochs, args.pool, args.methods) == ([1, 2], [0], 1, 200,
                                                                           ["dho", "single_head_kd"])
