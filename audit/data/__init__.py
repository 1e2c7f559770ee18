"""Stage 0, data: a dataset name, .npz file or image folder in, an `EvalData` out.

`load_dataset` (registry in `datasets`) reads torchvision datasets, .npz files and image
folders (`image_folders`, decoded lazily), applies `preprocessing` and the subset rules;
`class_maps` reads --class-names / --class-map; `demo` generates the offline demo data.
"""

from robaudit.audit.data.datasets import EvalData, load_dataset

__all__ = ["EvalData", "load_dataset"]
