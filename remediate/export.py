"""Export of the selected student: torch.export (.pt2, what robaudit recommends), TorchScript
and ONNX, each written atomically; a format an exporter cannot handle is reported, not fatal.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Sequence

import torch
from torch import nn

from robaudit.audit.io import write_bytes_atomic
from robaudit.errors import UserError

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("pt2", "torchscript", "onnx")


def export_student(module: nn.Module, example: torch.Tensor, out_dir: Path, formats: Sequence[str]) -> Dict[str, dict]:
    """Export the selected student (CPU, fp32, eval); a failed format is reported, not fatal."""
    module = copy.deepcopy(module).to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = example.to("cpu").float().contiguous()
    results: Dict[str, dict] = {}
    for fmt in formats:
        fmt = fmt.lower()
        try:
            if fmt == "pt2":
                from robaudit.audit.models.loading import save_export

                path = out_dir / "student.pt2"
                save_export(module, path, example)
            elif fmt == "torchscript":
                path = out_dir / "student.torchscript.pt"
                buffer = io.BytesIO()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # torch.jit is deprecated but still the format users load
                    torch.jit.save(torch.jit.trace(module, example), buffer)
                write_bytes_atomic(path, buffer.getvalue())
            elif fmt == "onnx":
                path = out_dir / "student.onnx"
                _export_onnx(module, example, path)
            else:
                raise UserError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
            results[fmt] = {"path": str(path), "ok": True, "error": None}
        except UserError:
            raise
        except Exception as err:   # an exporter's limitation must not cost the trained student
            log.warning("could not export the student as %s: %s", fmt, err)
            results[fmt] = {"path": None, "ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
    return results


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnx-export.", dir=path.parent))
    tmp_path = tmp_dir / path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:   # the torch.export-based exporter, batch dimension dynamic, weights in the one file
                torch.onnx.export(module, (example,), str(tmp_path), dynamo=True, verbose=False,
                                  external_data=False, input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
            except Exception:   # models torch.export cannot trace: the legacy TorchScript exporter
                torch.onnx.export(module, (example,), str(tmp_path), dynamo=False,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp_path, path)
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()


def parse_export_formats(text: str) -> tuple:
    """--export-formats "pt2,torchscript,onnx" -> the formats; pt2 or torchscript must be among
    them, since the student audit loads one of those."""
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not ({"pt2", "torchscript"} & set(formats)):
        raise UserError(f"--export-formats {text!r}: choose from {', '.join(EXPORT_FORMATS)}, with pt2 or "
                        f"torchscript among them (the student audit loads one of those)")
    return formats
