"""Data the library is handed in memory: (x, y) tensors or arrays, a torch Dataset, a DataLoader.

Everything becomes an `EvalData` as `load_dataset` builds it from an .npz file, with the
same checks (images NCHW or NHWC, uint8 0..255 or float in [0, 1]; integer labels >= 0).
The sample index (the seeding key of every attack) is the position in what was given, so
the same tensors give the same audit, batch by batch and chunk by chunk.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from robaudit.audit.data.datasets import EvalData, _images_to_nchw, _labels_array
from robaudit.errors import UserError

IN_MEMORY_NAME = "in-memory"


def _to_numpy(value, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as err:
        raise UserError(f"{what} is not an array or tensor ({type(value).__name__}): {err}") from None


def _stack_samples(samples, what: str):
    """(x, y) from an iterable of (image, label) samples or (images, labels) batches."""
    xs, ys = [], []
    for item in samples:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UserError(f"{what} must yield (image, label) pairs, got {type(item).__name__}")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        raise UserError(f"{what} holds no samples")
    if xs[0].ndim == 4 or (xs[0].ndim == 3 and ys[0].ndim == 1):   # batches (a DataLoader)
        return torch.cat(xs), torch.cat([y.reshape(-1) for y in ys])
    return torch.stack(xs), torch.stack([y.reshape(()) for y in ys])


def from_arrays(x, y, *, classes: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                name: str = IN_MEMORY_NAME, source: str = "(x, y) given in memory") -> EvalData:
    """EvalData from images x ([N, C, H, W] or [N, H, W, C]; uint8 or float in [0, 1]) and labels y."""
    images = _images_to_nchw(_to_numpy(x, "x"), "x")
    labels = _labels_array(_to_numpy(y, "y"), "y")
    if len(labels) != images.shape[0]:
        raise UserError(f"x holds {images.shape[0]} images but y holds {len(labels)} labels")
    if classes is not None:
        classes = [str(c) for c in classes]
    else:
        count = num_classes if num_classes is not None else int(labels.max()) + 1
        classes = [str(k) for k in range(count)]
    if labels.max() >= len(classes):
        raise UserError(f"y has label {int(labels.max())} but there are only {len(classes)} classes; "
                        "pass classes=[...] or num_classes=")
    pixels = np.ascontiguousarray(images, dtype=np.float32)
    if np.issubdtype(images.dtype, np.integer):
        pixels /= 255.0
    n = len(labels)
    return EvalData(name=name, split="given", x=torch.from_numpy(pixels), y=torch.from_numpy(labels.copy()),
                    index=torch.arange(n, dtype=torch.int64), classes=classes,
                    subset={"limit": None, "n_per_class": None, "total_in_split": n}, source=source)


def from_torch(data, *, classes=None, num_classes=None) -> EvalData:
    """EvalData from a torch Dataset or DataLoader yielding (image, label); a DataLoader should
    not shuffle (the position of a sample is its seeding key)."""
    what = type(data).__name__
    if classes is None:
        classes = getattr(data, "classes", None) or getattr(getattr(data, "dataset", None), "classes", None)
    if isinstance(data, torch.utils.data.DataLoader):
        sampler = getattr(data, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise UserError("the DataLoader shuffles: pass one with shuffle=False (or its Dataset), so "
                            "each sample keeps its position and its attack seed")
        x, y = _stack_samples(data, f"the {what}")
    else:
        x, y = _stack_samples((data[i] for i in range(len(data))), f"the {what}")
    return from_arrays(x, y, classes=classes, num_classes=num_classes, source=f"{what} given in memory")
