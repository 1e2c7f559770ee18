"""The nn.Modules the model boundary is made of (audit/models/adapters.py decides which, and how).

`BoundaryModel` runs the steps of adapters' pipeline around the model; `FixedBatchModule`
feeds a fixed-batch model in chunks; `SelectOutput` picks one output of several.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import nn

PROB_FLOOR = float(torch.finfo(torch.float32).tiny)   # 1.1755e-38; log -> -87.34


def _cat_outputs(outputs: List[Any]) -> Any:
    """Concatenate per-chunk outputs along the batch: tensors, tuples/lists or dicts of them."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_outputs([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _cat_outputs([o[k] for o in outputs]) for k in first}
    return first


def _take_rows(output: Any, n: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output[:n] if output.ndim else output
    if isinstance(output, (tuple, list)):
        return type(output)(_take_rows(o, n) for o in output)
    if isinstance(output, Mapping):
        return {k: _take_rows(v, n) for k, v in output.items()}
    return output


class FixedBatchModule(nn.Module):
    """Runs a module that only accepts batch size `batch_size` on any batch, in chunks.

    The last chunk is zero-padded and the padding rows dropped. Differentiable: the
    chunks are concatenated with torch ops. Tuple/list/dict outputs are concatenated
    element by element.
    """

    def __init__(self, module: nn.Module, batch_size: int):
        super().__init__()
        self.module = module
        self.batch_size = int(batch_size)

    def forward(self, x: torch.Tensor) -> Any:
        outputs = []
        for part in torch.split(x, self.batch_size):
            short = self.batch_size - len(part)
            if short:
                part = torch.cat([part, part.new_zeros((short,) + tuple(part.shape[1:]))])
            outputs.append(_take_rows(self.module(part), self.batch_size - short))
        return _cat_outputs(outputs)


class SelectOutput(nn.Module):
    """Picks one output (tuple index or dict key) of a module that returns several."""

    def __init__(self, module: nn.Module, key: Any):
        super().__init__()
        self.module = module
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[self.key]


def module_device(module: nn.Module) -> torch.device:
    """Where the module's first parameter or buffer lives (the CPU for a module with none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class BoundaryModel(nn.Module):
    """NCHW [0, 1] images in, logits in dataset class order out (the steps: audit/models/adapters.py)."""

    def __init__(self, model: nn.Module, *, scale: float = 1.0, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, layout: str = "nchw", output_kind: str = "logits",
                 column_order: Optional[Sequence[int]] = None):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        # Built where the wrapped model already lives: a CPU buffer would be copied to the
        # GPU on every forward (adapt_input's .to(x.device)).
        device = module_device(model)
        as_buffer = (lambda v: None if v is None else
                     torch.tensor(list(v), dtype=torch.float32, device=device).reshape(1, -1, 1, 1))
        self.register_buffer("mean", as_buffer(mean))
        self.register_buffer("std", as_buffer(std))
        self.register_buffer("column_order", None)
        self.layout = layout
        self.output_kind = output_kind
        self.set_column_order(column_order)

    def set_column_order(self, column_order: Optional[Sequence[int]]) -> None:
        """Output column k becomes the model's column column_order[k] (None: as given)."""
        self.column_order = (None if column_order is None
                             else torch.tensor(list(column_order), dtype=torch.long, device=module_device(self)))

    def is_identity(self) -> bool:
        return (self.scale == 1.0 and self.mean is None and self.layout == "nchw"
                and self.output_kind != "probs" and self.column_order is None)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1).contiguous()  # as a channels-last model receives its input
        return x

    def adapt_output(self, out: torch.Tensor) -> torch.Tensor:
        if self.output_kind == "probs":
            out = torch.log(out.float().clamp_min(PROB_FLOOR))
        if self.column_order is not None:
            out = out.index_select(1, self.column_order.to(out.device))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt_output(self.model(self.adapt_input(x)))
