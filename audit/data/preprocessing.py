"""Preprocessing at the data boundary: `--resize N`, `--center-crop M`, `--preprocess PRESET`.

Applied to the images in [0, 1] space before any attack sees them, so `--eps` keeps its
meaning (a budget on the pixels the model is handed, not on the original files).

Resizing follows torchvision's `Resize(N)`: the shorter side becomes N, the longer side
int(N * long / short), bilinear with antialiasing. It runs on the decoded uint8 image
(torchvision.transforms.v2.functional.resize on a uint8 CHW tensor, antialias=True), not on
floats, because:
- that is what the convention we reproduce does: RobustBench's ImageNet loader
  (robustbench/data.py, PREPROCESSINGS['Res256Crop224'] = Resize(256), CenterCrop(224),
  ToTensor()) resizes the decoded 8-bit PIL image and only then converts to float; torch's
  uint8 antialiased bilinear kernel is the PIL-style integer one, so it lands within one
  grey level of PIL's result, where a float resize would differ by rounding everywhere;
- a uint8 image is 4x smaller to move between DataLoader workers and the main process.
In-memory datasets (npz, torchvision, demo) arrive as float [0, 1] tensors and are resized
as floats (their pixels are not necessarily 8-bit); the record says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from robaudit.errors import UserError

# name -> (resize, center_crop). robustbench-imagenet: RobustBench's ImageNet convention
# ('Res256Crop224' in robustbench/data.py): shorter side to 256, then the central 224x224.
PRESETS: Dict[str, Tuple[Optional[int], Optional[int]]] = {
    "robustbench-imagenet": (256, 224),
}


@dataclass(frozen=True)
class Preprocessing:
    """What is done to every image before the audit: resize (shorter side), then center crop."""

    resize: Optional[int] = None
    center_crop: Optional[int] = None
    preset: Optional[str] = None

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H, W) of an image of size height x width after this preprocessing."""
        if self.resize is not None:
            height, width = resized_size(height, width, self.resize)
        if self.center_crop is not None:
            height, width = self.center_crop, self.center_crop
        return height, width

    def check_fits(self, height: int, width: int, where: str) -> None:
        """Refuse a crop larger than the (resized) image: torchvision would pad it with black."""
        if self.center_crop is None:
            return
        h, w = resized_size(height, width, self.resize) if self.resize is not None else (height, width)
        if min(h, w) < self.center_crop:
            after = f" after --resize {self.resize}" if self.resize is not None else ""
            raise UserError(f"{where} is {w}x{h}{after}, smaller than --center-crop {self.center_crop}; "
                            f"pass a --resize of at least {self.center_crop} or a smaller --center-crop")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Resize then center-crop a [C,H,W] or [N,C,H,W] tensor (uint8 or float), same dtype."""
        from torchvision.transforms.v2 import functional as F

        if self.resize is not None:
            images = F.resize(images, [self.resize], interpolation=F.InterpolationMode.BILINEAR,
                              antialias=True)
            if images.is_floating_point():
                # bilinear with antialiasing can overshoot [0, 1] by a rounding error; the
                # attacks check the range, so clip here, where the pixels are made
                images = images.clamp_(0.0, 1.0)
        if self.center_crop is not None:
            images = F.center_crop(images, [self.center_crop])
        return images

    def record(self, resized_as: str = "uint8") -> dict:
        """results.json dataset.preprocessing."""
        return {"resize": self.resize, "center_crop": self.center_crop,
                "interpolation": "bilinear" if self.resize is not None else None,
                "antialias": True if self.resize is not None else None,
                "resized_as": resized_as if self.resize is not None else None,
                "preset": self.preset}


def resized_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """torchvision Resize(size) output: shorter side -> size, longer side int(size * long / short)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resolve_preprocessing(resize: Optional[int] = None, center_crop: Optional[int] = None,
                          preset: Optional[str] = None) -> Optional[Preprocessing]:
    """Check the flags and combine them; None when nothing is applied."""
    if preset is not None:
        key = str(preset).strip().lower()
        if key not in PRESETS:
            raise UserError(f"unknown --preprocess {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        if resize is not None or center_crop is not None:
            preset_resize, preset_crop = PRESETS[key]
            raise UserError(f"--preprocess {key} already sets --resize {preset_resize} --center-crop "
                            f"{preset_crop}; give either the preset or --resize/--center-crop")
        resize, center_crop = PRESETS[key]
        preset = key
    for flag, value in (("--resize", resize), ("--center-crop", center_crop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{flag} must be a positive number of pixels, got {value!r}")
    if resize is not None and center_crop is not None and center_crop > resize:
        raise UserError(f"--center-crop {center_crop} is larger than the resized shorter side "
                        f"(--resize {resize}); the crop must fit inside the image")
    if resize is None and center_crop is None:
        return None
    return Preprocessing(resize=resize, center_crop=center_crop, preset=preset)


def preprocess_tensor(x: torch.Tensor, preprocessing: Optional[Preprocessing],
                      chunk: int = 256) -> torch.Tensor:
    """An in-memory float [0,1] NCHW dataset, preprocessed chunk by chunk (bounded scratch memory)."""
    if preprocessing is None:
        return x
    _, _, height, width = x.shape
    preprocessing.check_fits(int(height), int(width), "every image")
    parts = [preprocessing.apply(x[start:start + chunk]) for start in range(0, len(x), chunk)]
    return torch.cat(parts).contiguous() if parts else x
