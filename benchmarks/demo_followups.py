"""Follow-ups on a finished `dho demo` run: where DHO's knobs and the few-shot teachers move the numbers.

* The "10% weak teacher" setting (a teacher worse than its 1,000 labels): temperature 1 and 4 against the
  demo's 2, single-head KD at T = 1, and a Tip-Adapter teacher fitted on the labels.
* The "16-shot" setting with Tip-Adapter and Tip-Adapter-F teachers (each caches its own store).
* Both settings trained 4x longer (1,000 steps): CE-only, single-head KD and DHO.

Every run goes through the real stages (`cache_teacher`, `train_student`, `evaluate`) on the demo's own
pipeline.yaml files, shards and teachers, with the overrides that pin the settings it was recorded with
(the weak-teacher setting at 250 steps and 4 views). Runs already trained are only evaluated, so the script
resumes. Selection is on val, test is reported beside it. Writes a markdown table and OUT/followups.json.
Usage:

    dho demo --out demo-out && python benchmarks/demo_followups.py demo-out
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dho_pipeline.config import load_config
from stages import cache_teacher, evaluate, train_student

WEAK, FEW_SHOT, TEN_PERCENT = "10pct-weak-teacher", "16-shot", "10pct"
# The weak-teacher setting as the demo ran it before it moved to 1,000 steps and 8 views.
WEAK_250 = ["views.count=4", "train.steps=250"]
WEAK_1000 = ["views.count=4", "train.steps=1000"]
KD, CE = "train.method=single_head_kd", "train.method=ce_only"
# (setting folder, run name, overrides of the demo's pipeline.yaml; train.method is dho unless set)
RUNS = [
    (TEN_PERCENT, "ce_only-seed0", [CE]),
    (WEAK, "single_head_kd-seed0", [*WEAK_250, KD]),
    (WEAK, "single_head_kd-seed1", [*WEAK_250, KD, "train.seed=1"]),
    (WEAK, "dho-seed0", WEAK_250),
    (WEAK, "dho-seed1", [*WEAK_250, "train.seed=1"]),
    (WEAK, "single_head_kd-T1-seed0", [*WEAK_250, KD, "train.temperature=1"]),
    (WEAK, "dho-T1-seed0", [*WEAK_250, "train.temperature=1"]),
    (WEAK, "dho-T1-seed1", [*WEAK_250, "train.temperature=1", "train.seed=1"]),
    (WEAK, "dho-T4-seed0", [*WEAK_250, "train.temperature=4"]),
    (WEAK, "dho-tip-adapter-seed0", [*WEAK_250, "teacher.kind=tip-adapter"]),
    (FEW_SHOT, "dho-seed0", []),
    (FEW_SHOT, "dho-seed1", ["train.seed=1"]),
    (FEW_SHOT, "dho-tip-adapter-seed0", ["teacher.kind=tip-adapter"]),
    (FEW_SHOT, "dho-tip-adapter-seed1", ["teacher.kind=tip-adapter", "train.seed=1"]),
    (FEW_SHOT, "dho-tip-adapter-f-seed0", ["teacher.kind=tip-adapter-f"]),
    (FEW_SHOT, "dho-tip-adapter-f-seed1", ["teacher.kind=tip-adapter-f", "train.seed=1"]),
    # 4x the demo's 250 steps: do the students, still improving at 250, separate when trained longer?
    (WEAK, "ce_only-1000steps-seed0", [*WEAK_1000, CE]),
    (WEAK, "single_head_kd-1000steps-seed0", [*WEAK_1000, KD]),
    (WEAK, "dho-1000steps-seed0", WEAK_1000),
    (WEAK, "dho-T1-1000steps-seed0", [*WEAK_1000, "train.temperature=1"]),
    (WEAK, "single_head_kd-1000steps-seed1", [*WEAK_1000, KD, "train.seed=1"]),
    (WEAK, "dho-1000steps-seed1", [*WEAK_1000, "train.seed=1"]),
    (FEW_SHOT, "ce_only-1000steps-seed0", [CE, "train.steps=1000"]),
    (FEW_SHOT, "single_head_kd-1000steps-seed0", [KD, "train.steps=1000"]),
    (FEW_SHOT, "dho-1000steps-seed0", ["train.steps=1000"]),
    (FEW_SHOT, "single_head_kd-1000steps-seed1", [KD, "train.steps=1000", "train.seed=1"]),
    (FEW_SHOT, "dho-1000steps-seed1", ["train.steps=1000", "train.seed=1"]),
]


def follow_up(demo_out: Path, folder: str, name: str, overrides: list[str]) -> dict:
    """Train (unless an earlier call did) and evaluate one run; val and test top-1 of what its method deploys.

    Runs live in the setting's `followups/` folder, apart from the demo's own runs, so a change to the demo's
    plan never passes one of its runs off as a follow-up.
    """
    config = demo_out / folder / "pipeline.yaml"
    run_dir = demo_out / folder / "followups" / name
    if not (run_dir / "final.pt").exists():
        settings = ["train.method=dho", *overrides, f"train.out_dir={run_dir}"]
        cache_teacher.run(load_config(config, settings))  # a no-op when the store is complete
        train_student.run(load_config(config, settings), overwrite=True)  # an unfinished attempt starts over
    result = evaluate.run(run_dir / "final.pt")
    # combined_searched is what the checkpoint deploys: the CE head alone (alpha 1) for single-head methods.
    return {"setting": folder, "run": name, "val": result["val_combined_searched"],
            "test": result["combined_searched"], "alpha": result["alpha"] if result["method"] == "dho" else None,
            "teacher_test": result["teacher"]}


@click.command()
@click.argument("demo_out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def main(demo_out: Path) -> None:
    rows = [follow_up(demo_out.resolve(), *run) for run in RUNS]
    (demo_out / "followups.json").write_text(json.dumps(rows, indent=1))
    click.echo("| setting | run | teacher (test) | val | test | searched α |\n|---|---|---|---|---|---|")
    for r in rows:
        alpha = "—" if r["alpha"] is None else f"{r['alpha']:g}"
        click.echo(f"| {r['setting']} | {r['run']} | {r['teacher_test']:.3f} | {r['val']:.3f} | {r['test']:.3f} "
                   f"| {alpha} |")


if __name__ == "__main__":
    main()
