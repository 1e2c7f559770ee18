"""The boundary's plain types: what the user asked for (`BoundaryRequest`), what a format's
reader found (`ModelInfo`), and a model its reader finishes later (`DeferredModel`).

They sit below both `adapters` (which builds the boundary) and `adaptations` (which
describes it), so neither imports the other's types back.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from torch import nn


@dataclass
class BoundaryRequest:
    """The boundary flags, checked (`resolve_request`); `build_boundary` applies them."""
    input_shape: Tuple[int, ...] = (3, 32, 32)    # the dataset's (C, H, W)
    device: str = "cpu"
    input_layout: str = "auto"                   # --input-layout auto|nchw|nhwc
    input_range: str = "0-1"                     # --input-range, and the factor it means
    scale: float = 1.0
    mean: Optional[List[float]] = None           # --mean/--std, one value per channel
    std: Optional[List[float]] = None
    mean_source: str = "--mean/--std"            # or the file's mu/sigma buffers (load_model)
    output: str = "auto"                         # --output auto|logits|probs|log-probs
    output_name: Optional[str] = None
    num_classes: Optional[int] = None
    dataset_classes: Optional[List[str]] = None
    names: Optional[List[str]] = None            # --class-names, in dataset label order
    names_source: Optional[str] = None           # the file they came from
    mapping: Optional[List[int]] = None          # --class-map: model index -> dataset class index
    map_source: Optional[str] = None


@dataclass
class ModelInfo:
    """What a format's reader learned about the model as it arrived (formats.ModelFormat.read)."""
    format: str                                   # the name LoadedModel.format reports
    arch: Optional[str] = None                    # architecture the weights were loaded into
    declared_input_shape: Optional[List[Any]] = None  # the model's own input dims (str: symbolic)
    fixed_batch: Optional[int] = None             # the batch size the model was exported with, if fixed
    batch_chunked: bool = False                   # whether the module is fed chunks of fixed_batch
    white_box: bool = True                        # False: only black-box attacks (see refusal)
    refusal: Optional[str] = None
    num_params: Optional[int] = None              # None: counted from the module's parameters
    on_device: bool = False                       # already on the device (not moved with .to)
    notes: List[str] = field(default_factory=list)  # -> adaptations["notes"]
    onnx: Optional[Dict[str, Any]] = None         # -> adaptations["onnx"]
    deferred: Optional["DeferredModel"] = None    # a model finished once layout and output are known
    arch_inferred: Optional[Dict[str, Any]] = None  # how arch was read off the weights (arch_inference)
    # {"mean", "std", "source"} the file says the input is normalised with (mu/sigma buffers),
    # for the boundary to apply; None when the model normalises its own input or says nothing.
    input_normalization: Optional[Dict[str, Any]] = None


class DeferredModel(abc.ABC):
    """A model that its reader can only finish once the boundary has decided the input
    layout and the output (ONNX: onnxruntime's outputs on a probe in the model's layout,
    then the onnx2torch conversion checked against the chosen one; audit/models/onnx_support.py).

    `build_boundary` calls `outputs`, chooses the output among them as for any model, and
    attacks what `finish` returns.
    """

    @abc.abstractmethod
    def outputs(self, native_shape: Tuple[int, ...], scale: float, layout: str,
                layout_reason: str) -> Tuple[Dict[str, Any], int]:
        """Every output on the reader's probe batch of images of `native_shape` with values
        in [0, scale], and that batch's size."""

    @abc.abstractmethod
    def finish(self, key: Any, names: List[str], outputs: Dict[str, Any], info: ModelInfo) -> nn.Module:
        """The module (model layout in, output `key` out) to attack; may update `info`."""
