"""Export a trained student (final.pt) for serving: ONNX, TorchScript or safetensors, described by a JSON beside it.

ONNX and TorchScript hold one model from a normalised image batch (N, 3, S, S) to class probabilities (N, C):
the combination p = alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta) with the run's searched alpha and
beta baked in, or one head's softmax. safetensors holds the timm backbone under timm's own names, so
`timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=...))` loads it, and
both heads as ce_head.* and kd_head.*. `<out>.json` (and the safetensors metadata) hold the preprocessing, the
class names, the method, alpha and beta.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dho_pipeline.errors import DhoError
from dho_pipeline.extras import require_extra
from dho_pipeline.student.evaluation import combine
from dho_pipeline.student.from_checkpoint import TrainedStudent, load_student
from dho_pipeline.student.model import DualHeadStudent

HEADS = ("combined", "ce", "kd")
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
HEAD_PREFIXES = ("ce_head.", "kd_head.")
TOLERANCE = 1e-4  # largest difference in probability allowed between the exported model and the student
PREPROCESS = ("RGB; the centre square of the image (side: its shorter side), resized to image_size x image_size "
              "(bicubic, antialiased); pixel / 255; (x - mean) / std per channel; float32, NCHW")


class ExportError(DhoError, ValueError):
    """A student cannot be exported as asked; the message names the checkpoint or the file."""


class ProbabilityModel(nn.Module):
    """Normalised images (N, 3, S, S) -> class probabilities (N, C) of one head or of the alpha/beta combination."""

    def __init__(self, student: DualHeadStudent, head: str, alpha: float, beta: float):
        super().__init__()
        self.student, self.head, self.alpha, self.beta = student, head, alpha, beta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ce, kd = self.student(images)
        if self.head == "ce":
            return ce.softmax(-1)
        if self.head == "kd":
            return kd.softmax(-1)
        return combine(ce, kd, self.alpha, self.beta)


def description_path(out: Path) -> Path:
    """Where the JSON description of exported file `out` goes: its name plus .json (model.onnx -> model.onnx.json)."""
    return out.with_name(out.name + ".json")


def export_student(checkpoint: Path, fmt: str, out: Path, head: str = "combined") -> dict:
    """Write the student of `checkpoint` (a final.pt) to `out` in `fmt` and its description to description_path(out).

    The exported model is checked against the student on a batch of another size before this returns; the
    description is returned.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt!r}: not one of {', '.join(WRITERS)}")
    if head not in HEADS:
        raise ExportError(f"--head {head!r}: not one of {', '.join(HEADS)}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder to write {out.name} into")
    if out.is_dir():
        raise ExportError(f"{out}: a folder; --out names the file to write")
    if fmt == "onnx":
        require_extra("export", "--format onnx", "onnx", "onnxruntime")
    if fmt == "safetensors":
        require_extra("export", "--format safetensors", "safetensors")
    student = load_student(checkpoint, torch.device("cpu"))
    method, kind = student.checkpoint["method"], student.checkpoint["config"]["student"]["kind"]
    if head == "kd" and method != "dho":
        raise ExportError(f"{checkpoint}: a {method} run never trained its KD head: export --head ce or combined")
    if fmt == "safetensors" and kind != "timm":
        raise ExportError(f"{checkpoint}: --format safetensors is for timm students (this one is {kind}): "
                          "export it as onnx or torchscript")
    if fmt == "safetensors" and head != "combined":
        raise ExportError("--head is for onnx and torchscript: a safetensors file holds both heads")
    description = describe(student, checkpoint, fmt, out, head)
    try:
        WRITERS[fmt](student, head, out, description)
    except ExportError:
        out.unlink(missing_ok=True)  # a file that does not match the student is not left behind
        raise
    description_path(out).write_text(json.dumps(description, indent=1) + "\n")
    return description


def describe(student: TrainedStudent, checkpoint: Path, fmt: str, out: Path, head: str) -> dict:
    """What a user of the exported file needs: model, preprocessing (also as timm data config), classes, alpha/beta."""
    config = student.checkpoint["config"]["student"]
    size, mean, std = student.data.image_size, list(student.data.mean), list(student.data.std)
    description = {
        "file": out.name, "format": fmt, "checkpoint": str(checkpoint),
        "model_kind": config["kind"], "model": config["model"], "method": student.checkpoint["method"],
        "alpha": student.alpha, "beta": student.beta, "class_names": student.class_names,
        "image_size": size, "mean": mean, "std": std, "preprocess": PREPROCESS,
        "data_config": {"input_size": [3, size, size], "interpolation": "bicubic", "mean": mean, "std": std,
                        "crop_pct": 1.0, "crop_mode": "center"},
    }
    if fmt == "safetensors":
        state = student.model.state_dict()
        description["heads"] = {prefix[:-1]: [k for k in state if k.startswith(prefix)] for prefix in HEAD_PREFIXES}
        description["load_backbone"] = (f"timm.create_model({config['model']!r}, pretrained=True, num_classes=0, "
                                        f"pretrained_cfg_overlay=dict(file={out.name!r}, **data_config))")
    else:
        description["head"] = head
        description["input"] = {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"}
        description["output"] = {"name": OUTPUT_NAME, "shape": ["batch", len(student.class_names)]}
    return description


@torch.no_grad()
def _write_onnx(student: TrainedStudent, head: str, out: Path, description: dict) -> None:
    """The description goes into the model's metadata (key "dho").

    The legacy, TorchScript-based exporter: with torch 2.14 the torch.export-based one (dynamo=True) needs
    onnxscript besides and took 4 s for resnet10t and 13 s for the tiny CLIP tower here, this one about 1 s.
    """
    model = ProbabilityModel(student.model, head, student.alpha, student.beta).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, (_example(student, 2),), str(out), dynamo=False, opset_version=17,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    import onnx

    exported = onnx.load(str(out))
    onnx.helper.set_model_props(exported, {"dho": json.dumps(description)})
    onnx.save(exported, str(out))

    def run(images: torch.Tensor) -> torch.Tensor:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])

    _check(out, model, run, student)


@torch.no_grad()
def _write_torchscript(student: TrainedStudent, head: str, out: Path, description: dict) -> None:
    """torch.jit.trace, the description as the extra file dho.json; the check runs the saved file on another
    batch size than the traced one."""
    model = ProbabilityModel(student.model, head, student.alpha, student.beta).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="`torch.jit.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, _example(student, 2), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"dho.json": json.dumps(description)})
        _check(out, model, torch.jit.load(str(out)), student)


@torch.no_grad()
def _write_safetensors(student: TrainedStudent, head: str, out: Path, description: dict) -> None:
    """The backbone under timm's names (the student's `backbone.` prefix dropped), the heads as ce_head.*, kd_head.*;
    the description in the metadata, one string per key (JSON for all but strings). Written by Python, not
    save_file (which makes a 0600 file), so it gets the umask's mode as the other formats do."""
    from safetensors.torch import save

    tensors = {k.removeprefix("backbone."): v.contiguous() for k, v in student.model.state_dict().items()}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in description.items()}
    out.write_bytes(save(tensors, metadata=metadata))


WRITERS: dict[str, Callable[[TrainedStudent, str, Path, dict], None]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors,
}


def _example(student: TrainedStudent, batch: int) -> torch.Tensor:
    size = student.data.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _check(out: Path, model: nn.Module, run_exported: Callable[[torch.Tensor], torch.Tensor],
           student: TrainedStudent) -> None:
    """ExportError unless the exported model's probabilities match the student's on a batch of 3 (traced with 2)."""
    images = _example(student, 3)
    difference = float((run_exported(images) - model(images)).abs().max())
    if not difference <= TOLERANCE:
        raise ExportError(f"{out}: the exported model's probabilities differ from the student's by {difference:.2g} "
                          f"(more than {TOLERANCE:g}) on a batch of 3 images; this model does not export as traced")
