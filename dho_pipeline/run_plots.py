"""Training curves of several runs side by side: loss and val top-1 per head, from each run folder's metrics.jsonl.

Each run is labelled by its method and seed, read from the config in its final.pt (or last.pt, while it runs).
One-head runs (single_head_kd, ce_only) show their CE head only: their KD head is never trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dho_pipeline.errors import DhoError, warn
from dho_pipeline.student.checkpoint import load_checkpoint

# (title, the value of a metrics.jsonl record drawn in it, whether one-head runs are drawn in it)
PANELS = (
    ("training loss", "loss", True),
    ("val top-1: CE head", "ce_head", True),
    ("val top-1: KD head", "kd_head", False),
    ("val top-1: combined (default alpha, beta)", "combined", False),
)


class NotARun(DhoError, ValueError):
    """A folder given to `dho plot` is not a train-student run folder; the message names it."""


@dataclass
class RunCurves:
    """One run's metrics: its label and method, its training log lines and its validation lines."""

    label: str
    method: str
    train: list[dict]
    val: list[dict]


def read_run(folder: Path) -> RunCurves:
    """The curves of run folder `folder` (metrics.jsonl and final.pt or last.pt); a cut-off line is skipped."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise NotARun(f"{folder}: no metrics.jsonl here, not a train-student run folder (train.out_dir)")
    checkpoint = next((p for p in (folder / "final.pt", folder / "last.pt") if p.is_file()), None)
    if checkpoint is None:
        raise NotARun(f"{folder}: no final.pt or last.pt to read the run's method and seed from")
    train_config = load_checkpoint(checkpoint)["config"]["train"]
    method = train_config["method"]
    records = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            warn(f"{metrics}:{number}: skipped a line that is not a whole record: {line[:40]!r}")
    return RunCurves(f"{method} seed {train_config['seed']} ({folder.name})", method,
                     [r for r in records if "loss" in r], [r for r in records if "val" in r])


def draw_runs(runs: list[RunCurves]) -> Figure:
    """One panel per entry of PANELS, one line per run in it (the same colour in every panel), x: the step."""
    fig = Figure(figsize=(4.2 * len(PANELS), 3.8))
    axes = fig.subplots(1, len(PANELS))
    for ax, (title, key, one_head_runs_too) in zip(axes, PANELS, strict=True):
        for k, run in enumerate(runs):
            if not one_head_runs_too and run.method != "dho":
                continue
            records = run.train if key == "loss" else [{"step": r["step"], key: r["val"][key]} for r in run.val]
            ax.plot([r["step"] for r in records], [r[key] for r in records], color=f"C{k}", label=run.label,
                    marker="." if len(records) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.sharey(axes[1])  # the heads' accuracies on one scale
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("top-1")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(folders: list[Path], out: Path) -> Figure:
    """Draw the runs in `folders` and save the figure to `out` (.png, .pdf, .svg, ...); returns the figure."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder to write {out.name} into")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise DhoError(f"{out}: matplotlib cannot write {out.suffix or 'a file without a suffix'} "
                       f"(use one of .{', .'.join(sorted(formats))})")
    fig = draw_runs([read_run(folder) for folder in folders])
    FigureCanvasAgg(fig).print_figure(out, dpi=120)
    return fig
