"""How long a `dho demo` plan takes at the speed of the machine that ran another plan.

Two demo runs on different days rarely get equally fast cores. This compares their results.json timings on
the stages both plans ran alike (teacher pretraining, stores and student runs of the same name, minus the
settings given with --changed), and scales the new run's total by that speed ratio:

    python benchmarks/demo_time.py demo-out/results.json docs/demo-results.json --changed "10% weak teacher"
    git show 8f33450:docs/demo-results.json > old.json   # the 2026-11-26 plan, for the README's comparison
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("new", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("reference", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--changed", multiple=True, help="A setting whose stages differ between the plans (repeatable).")
def main(new: Path, reference: Path, changed: tuple[str, ...]) -> None:
    results = {path: json.loads(path.read_text()) for path in (new, reference)}
    for path, result in results.items():
        if result.get("reused"):  # a call that continued an earlier one: its timings leave that work out
            raise click.UsageError(f"{path} reused an earlier call's {', '.join(result['reused'])}: time a whole "
                                   "call instead (dho demo --out on a new folder)")
    new_t, ref_t = (results[path]["timings"] for path in (new, reference))
    shared = [k for k in new_t if k in ref_t and k != "total_s" and k.split("/")[0] not in changed]
    slowdown = sum(new_t[k] for k in shared) / sum(ref_t[k] for k in shared)
    click.echo(json.dumps({
        "shared_stages": len(shared), "new_machine_slowdown": round(slowdown, 3),
        "new_total_min": round(new_t["total_s"] / 60, 1), "reference_total_min": round(ref_t["total_s"] / 60, 1),
        "new_total_at_reference_speed_min": round(new_t["total_s"] / slowdown / 60, 1)}))


if __name__ == "__main__":
    main()
