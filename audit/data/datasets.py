"""Evaluation data: torchvision datasets, .npz files and image folders -> `EvalData`.

`load_dataset(name, ...)` accepts
- a registered name: cifar10, cifar100, svhn (torchvision; downloaded into `data_dir`,
  default $ROBAUDIT_DATA or ~/.cache/robaudit/data), or npz / imagefolder with the path
  as `data_dir`. `load_dataset("cifar10", data_dir="file.npz")` reads CIFAR-10 from
  that .npz instead of torchvision's files;
- a path to an .npz file or to an image folder (one sub-folder per class, or a flat folder
  with a labels file; audit/data/image_folders.py). Image folders load lazily: EvalData.x is a
  `LazyImages` that decodes the files it is indexed with.

Preprocessing (`resize`, `center_crop`, `preprocess` preset; audit/data/preprocessing.py) applies
to every dataset in [0, 1] space and is recorded in EvalData.preprocessing.

Every loader first yields the full split's labels plus a way to fetch images by
position; the subset is chosen on the labels and only its images are converted (an
image folder only reads the selected files). Subsets are deterministic:
`n_per_class=K` keeps the first K samples of each class, then `limit=N` keeps the
first N of those, always in dataset order. `EvalData.index` is each sample's position
in the full split, the key for per-sample randomness (robaudit.audit.rng).

Image layouts accepted in .npz files: uint8 (or any integer type within 0..255) or
float in [0, 1]; NHWC or NCHW, told apart by which of axis 1 / axis 3 has 1 or 3
entries; when both do (e.g. 3x3 images) the conventional layout of the dtype decides
(integer -> NHWC, float -> NCHW). 3-D arrays are single-channel NHW images.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from robaudit.audit.data.image_folders import IMAGE_EXTENSIONS  # noqa: F401  (re-exported)
from robaudit.errors import UserError
from robaudit.registry import Registry

DATASETS = Registry("dataset")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
# CIFAR-100 fine labels in label order (the official meta file lists them alphabetically).
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
SVHN_CLASSES = [str(d) for d in range(10)]  # torchvision maps SVHN's label 10 to digit 0



@dataclass
class EvalData:
    name: str
    split: str
    x: torch.Tensor                # float32 NCHW in [0,1], contiguous, CPU
    y: torch.Tensor                # int64
    index: torch.Tensor            # int64 position of each sample in the full split (seeding key)
    classes: List[str]
    subset: dict                   # {"limit", "n_per_class", "total_in_split"} (+ image folder notes)
    source: str
    preprocessing: Optional[dict] = None   # resize / center crop applied (Preprocessing.record); None: none

    # x: a float32 tensor for in-memory datasets; image folders give a LazyImages
    # (audit/data/image_folders.py) that decodes on indexing.

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class _FullSplit:
    """One split before subsetting: all labels, and images fetched by position on demand."""

    name: str
    labels: np.ndarray                              # int64 [N]
    take_images: Callable[[np.ndarray], np.ndarray]  # positions -> [k,C,H,W] uint8 or float in [0,1]
    classes: List[str]
    source: str


def list_datasets() -> List[str]:
    """Registered dataset names (a path to an .npz file or image folder also works)."""
    return DATASETS.names()


def default_data_dir() -> Path:
    """Where torchvision datasets are downloaded: $ROBAUDIT_DATA, else ~/.cache/robaudit/data."""
    env_dir = os.environ.get("ROBAUDIT_DATA")
    if env_dir:
        return Path(env_dir).expanduser()
    return Path.home() / ".cache" / "robaudit" / "data"


def subset_indices(labels, *, limit: Optional[int] = None,
                   n_per_class: Optional[int] = None) -> np.ndarray:
    """Positions kept by the subset rules, ascending: first `n_per_class` of each class, then first `limit`."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    selected = np.arange(labels.size, dtype=np.int64)
    if n_per_class is not None:
        # Rank of each sample within its class, in dataset order: a stable sort keeps
        # dataset order inside each class block, and rank = offset from the block start.
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        block_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
        rank = np.empty(labels.size, dtype=np.int64)
        rank[order] = np.arange(labels.size, dtype=np.int64) - block_start
        selected = np.flatnonzero(rank < n_per_class).astype(np.int64)
    if limit is not None:
        selected = selected[:limit]
    return selected


def _check_count(value, what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def load_dataset(name, *, split: str = "test", data_dir=None, limit: Optional[int] = None,
                 n_per_class: Optional[int] = None, download: bool = True, resize: Optional[int] = None,
                 center_crop: Optional[int] = None, preprocess: Optional[str] = None, labels=None,
                 class_names=None, skip_bad_images: bool = False, workers: Optional[int] = None,
                 expected_classes: Optional[int] = None) -> EvalData:
    """Load a split (test for audits, train for remediation), optionally as a deterministic subset.

    resize / center_crop / preprocess (a preset name, audit/data/preprocessing.py PRESETS) are
    applied to every dataset, in [0, 1] space. Image folders come back lazy (EvalData.x a
    `LazyImages`); labels (a labels file for a flat folder), class_names (--class-names for
    folders, image_folders.py) and skip_bad_images only apply to image folders; workers:
    decode workers of stream_batches (x.workers) and threads of the up-front image checks
    (None: min(4, cpu count); 0: decode in the main process, checks in min(4, cpus) threads).
    expected_classes (--num-classes): an image folder whose class count differs is refused
    right after listing, before any image file is opened.
    """
    from robaudit.audit.data.preprocessing import preprocess_tensor, resolve_preprocessing

    limit = _check_count(limit, "limit")
    n_per_class = _check_count(n_per_class, "n_per_class")
    preprocessing = resolve_preprocessing(resize, center_crop, preprocess)
    folder = image_folder_path(name, data_dir)
    if folder is not None:
        return _load_image_folder(folder, split, limit, n_per_class, preprocessing, labels, class_names,
                                  skip_bad_images, workers, expected_classes)
    for flag, value in (("--labels", labels), ("--skip-bad-images", skip_bad_images or None)):
        if value is not None:
            raise UserError(f"{flag} applies to image folders only; {os.fspath(name)} is not one")
    name_text = os.fspath(name)
    if name_text.lower() in DATASETS:
        full = DATASETS.get(name_text)(split=split, data_dir=data_dir, download=download)
    else:
        path = Path(name_text).expanduser()
        if path.is_file() or path.suffix.lower() == ".npz":
            full = _npz_split(path, split)
        else:
            raise UserError(
                f"unknown dataset {name_text!r}; choose one of: {', '.join(list_datasets())}, "
                f"or pass the path of an .npz file or of an image folder"
            )

    classes = list(full.classes)
    if class_names is not None:
        from robaudit.audit.data.class_maps import read_class_names

        classes = read_class_names(os.fspath(class_names), classes)
    selected = subset_indices(full.labels, limit=limit, n_per_class=n_per_class)
    images = full.take_images(selected)
    x = np.ascontiguousarray(images, dtype=np.float32)
    if np.issubdtype(images.dtype, np.integer):
        x /= 255.0
    return EvalData(
        name=full.name,
        split=split,
        x=preprocess_tensor(torch.from_numpy(x), preprocessing),
        y=torch.from_numpy(np.ascontiguousarray(full.labels[selected], dtype=np.int64)),
        index=torch.from_numpy(selected.astype(np.int64)),
        classes=classes,
        subset={"limit": limit, "n_per_class": n_per_class, "total_in_split": int(full.labels.size)},
        source=full.source,
        preprocessing=None if preprocessing is None else preprocessing.record(resized_as="float32"),
    )


def _array_taker(images: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def take(positions: np.ndarray) -> np.ndarray:
        if positions.size == images.shape[0]:  # selection is the whole split: skip the copy
            return images
        return images[positions]

    return take


def _check_split(dataset: str, split: str, available: Sequence[str]) -> None:
    if split in available:
        return
    if split == "train":
        raise UserError(f"{dataset} has no training split; remediation needs one "
                        f"(available: {', '.join(available)})")
    raise UserError(f"{dataset} has no {split!r} split; choose one of: {', '.join(available)}")


# ---------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class _TorchvisionSpec:
    name: str
    title: str
    classes: List[str]
    splits: tuple
    local_files: str   # what to put under the data dir when downloading is impossible


_TORCHVISION_SPECS = {
    "cifar10": _TorchvisionSpec("cifar10", "CIFAR-10", CIFAR10_CLASSES, ("test", "train"),
                                "cifar-10-batches-py"),
    "cifar100": _TorchvisionSpec("cifar100", "CIFAR-100", CIFAR100_CLASSES, ("test", "train"),
                                 "cifar-100-python"),
    "svhn": _TorchvisionSpec("svhn", "SVHN", SVHN_CLASSES, ("test", "train", "extra"),
                             "test_32x32.mat / train_32x32.mat"),
}


def _load_torchvision(spec: _TorchvisionSpec, split: str, data_dir, download: bool) -> _FullSplit:
    if data_dir is not None and (Path(data_dir).suffix.lower() == ".npz" or Path(data_dir).is_file()):
        return _npz_split(Path(data_dir).expanduser(), split, dataset_name=spec.name,
                          dataset_classes=spec.classes)
    _check_split(spec.name, split, spec.splits)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if spec.name == "svhn":
        try:
            import scipy.io  # noqa: F401  (torchvision reads SVHN's .mat files with scipy)
        except ImportError as err:
            raise UserError("SVHN's .mat files need scipy: pip install scipy, "
                            "or pass an .npz file with x_test/y_test instead") from err

    import torchvision.datasets as tv_datasets

    try:
        if spec.name == "cifar10":
            dataset = tv_datasets.CIFAR10(str(root), train=split == "train", download=download)
        elif spec.name == "cifar100":
            dataset = tv_datasets.CIFAR100(str(root), train=split == "train", download=download)
        else:
            dataset = tv_datasets.SVHN(str(root), split=split, download=download)
    except Exception as err:  # network, disk, archive and integrity failures all end the same way
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        problem = (f"could not download {spec.title} (no network?) [{reason}]" if download
                   else f"{spec.title} not found under {root} and download is off [{reason}]")
        raise UserError(
            f"{problem}; put {spec.local_files} under {root} and pass --data-dir {root}, "
            f"or pass an .npz file with x_test/y_test"
        ) from err

    if spec.name == "svhn":
        images = np.asarray(dataset.data)                                 # uint8 NCHW
        labels = np.asarray(dataset.labels, dtype=np.int64)
        classes = list(SVHN_CLASSES)
    else:
        images = np.asarray(dataset.data).transpose(0, 3, 1, 2)           # uint8 NHWC -> NCHW view
        labels = np.asarray(dataset.targets, dtype=np.int64)
        classes = list(dataset.classes)                                   # from the dataset's meta file
    return _FullSplit(spec.name, labels, _array_taker(images), classes, str(root))


@DATASETS.register("cifar10", help="CIFAR-10 via torchvision (10 classes, 32x32)")
def _cifar10(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    return _load_torchvision(_TORCHVISION_SPECS["cifar10"], split, data_dir, download)


@DATASETS.register("cifar100", help="CIFAR-100 via torchvision (100 classes, 32x32)")
def _cifar100(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    return _load_torchvision(_TORCHVISION_SPECS["cifar100"], split, data_dir, download)


@DATASETS.register("svhn", help="SVHN via torchvision (digits 0-9, 32x32; needs scipy)")
def _svhn(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    return _load_torchvision(_TORCHVISION_SPECS["svhn"], split, data_dir, download)


# ---------------------------------------------------------------------------- .npz


def _images_to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """Validate an image array and return it as NCHW (a view where possible), dtype unchanged
    except integer types, which become uint8."""
    if images.ndim == 3:
        images = images[:, None]  # single-channel NHW
    if images.ndim != 4:
        raise UserError(f"{where} has shape {images.shape}; expected images as NHWC or NCHW")
    if images.shape[0] == 0:
        raise UserError(f"{where} holds no images")
    channels_first = images.shape[1] in (1, 3)
    channels_last = images.shape[3] in (1, 3)
    is_integer = np.issubdtype(images.dtype, np.integer) and images.dtype != np.bool_
    is_float = np.issubdtype(images.dtype, np.floating)
    if not (is_integer or is_float):
        raise UserError(f"{where} has dtype {images.dtype}; expected uint8 0..255 or float in [0, 1]")
    if channels_first and channels_last:
        channels_last = is_integer  # ambiguous shape: uint8 files are NHWC, float files NCHW
    elif not (channels_first or channels_last):
        raise UserError(f"{where} has shape {images.shape}; cannot find a 1- or 3-channel axis "
                        f"(expected NHWC or NCHW)")
    if channels_last:
        images = images.transpose(0, 3, 1, 2)

    low, high = images.min(), images.max()
    if is_integer:
        if low < 0 or high > 255:
            raise UserError(f"{where} integer values span [{low}, {high}]; expected 0..255")
        return images.astype(np.uint8, copy=False)
    if not np.isfinite(images).all():
        raise UserError(f"{where} contains NaN or infinite values")
    if low < 0 or high > 1:
        raise UserError(f"{where} float values span [{low:.4g}, {high:.4g}]; expected [0, 1] "
                        f"(divide 0..255 data by 255, or store it as uint8)")
    return images


def _labels_array(raw: np.ndarray, where: str) -> np.ndarray:
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]  # column vectors are common in exported label files
    if raw.ndim != 1:
        raise UserError(f"{where} has shape {raw.shape}; expected one integer label per image")
    if not np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
        raise UserError(f"{where} has dtype {raw.dtype}; expected integer class indices")
    if raw.size and raw.min() < 0:
        raise UserError(f"{where} has negative labels (min {raw.min()}); expected 0..C-1")
    return raw.astype(np.int64, copy=False)


def _class_name_list(raw: np.ndarray) -> List[str]:
    names = np.asarray(raw).reshape(-1)
    if names.dtype.kind == "S":  # byte strings, e.g. written by Python 2-era tools
        return [n.decode("utf-8") for n in names]
    return [str(n) for n in names]


def _npz_split(path: Path, split: str, dataset_name: Optional[str] = None,
               dataset_classes: Optional[Sequence[str]] = None) -> _FullSplit:
    """Read one split of an .npz file; `dataset_name/classes` force a known dataset's identity."""
    if not path.is_file():
        raise UserError(f"no such .npz file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:   # EOFError: an empty file
        raise UserError(f"cannot read {path} as an .npz file ({type(err).__name__}: {err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not an .npz archive with x_test/y_test")

    with archive:
        keys = set(archive.files)
        if split == "test":
            x_key, y_key = ("x_test", "y_test") if "x_test" in keys else ("x", "y")
        elif split == "train":
            x_key, y_key = "x_train", "y_train"
            if x_key not in keys:
                raise UserError(f"{path} has no training split; add x_train/y_train arrays to it")
        else:
            raise UserError(f"{path} has no {split!r} split; .npz files offer test and train")
        if x_key not in keys:
            raise UserError(f"{path} has no x_test/y_test (or x/y) arrays; it has: "
                            f"{', '.join(sorted(keys)) or 'nothing'}")
        if y_key not in keys:
            raise UserError(f"{path} has {x_key} but no {y_key} labels")

        try:
            images = _images_to_nchw(archive[x_key], f"{path.name}:{x_key}")
            labels = _labels_array(archive[y_key], f"{path.name}:{y_key}")
            # The class count comes from every label array in the file, so a train and a
            # test split of one file always agree on it.
            all_labels = [labels] + [_labels_array(archive[k], f"{path.name}:{k}")
                                     for k in ("y_test", "y", "y_train") if k in keys and k != y_key]
            file_classes = (_class_name_list(archive["class_names"])
                            if "class_names" in keys else None)
        except ValueError as err:  # object arrays need pickle, which a data file must not require
            raise UserError(f"cannot read {path}: {err}; save arrays without pickle "
                            f"(class_names as a string array)") from err

    if labels.size != images.shape[0]:
        raise UserError(f"{path.name}: {x_key} has {images.shape[0]} images but {y_key} "
                        f"has {labels.size} labels")
    num_labelled = int(max(int(a.max()) for a in all_labels if a.size) + 1) if labels.size else 0

    stem = path.stem.lower()
    name = path.stem
    if dataset_classes is not None:
        classes = list(dataset_classes)
        name = dataset_name
    elif file_classes is not None:
        classes = file_classes
    else:
        # A file named after a known dataset (cifar10_subset.npz) with its class count is
        # that dataset; longest names first so "cifar100..." is not taken for "cifar10".
        known = next((spec for key, spec in sorted(_TORCHVISION_SPECS.items(), key=lambda kv: -len(kv[0]))
                      if stem.startswith(key) and len(spec.classes) == num_labelled), None)
        if known is not None:
            classes, name = list(known.classes), known.name
        else:
            classes = [str(k) for k in range(num_labelled)]
    if num_labelled > len(classes):
        raise UserError(f"{path.name}: labels go up to {num_labelled - 1} but there are only "
                        f"{len(classes)} classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    return _FullSplit(name, labels, _array_taker(images), classes, str(path.resolve()))


@DATASETS.register("npz", help="an .npz file (x_test/y_test or x/y, optional x_train/y_train, class_names)")
def _npz(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    if data_dir is None:
        raise UserError("the npz dataset needs a file: pass the .npz path as the dataset or as --data-dir")
    return _npz_split(Path(data_dir).expanduser(), split)


# ---------------------------------------------------------------------------- image folders


def image_folder_path(name, data_dir=None) -> Optional[Path]:
    """The folder when `name` (or imagefolder + data_dir) names an image folder, else None."""
    name_text = os.fspath(name)
    if name_text.lower() == "imagefolder":
        if data_dir is None:
            raise UserError("the imagefolder dataset needs a folder: pass its path as the dataset or as --data-dir")
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"no such image folder: {folder}")
        return folder
    if name_text.lower() in DATASETS:
        return None
    path = Path(name_text).expanduser()
    return path if path.is_dir() else None


def _load_image_folder(folder: Path, split: str, limit, n_per_class, preprocessing, labels, class_names,
                       skip_bad_images: bool, workers: Optional[int], expected_classes=None) -> EvalData:
    """A lazily decoded image folder: listing, subset, up-front header (or decode) checks."""
    from robaudit.audit.data.image_folders import (SHOWN_SKIPPED, LazyImages, common_shape, decode_check,
                                              header_sizes, list_image_folder)

    listing = list_image_folder(folder, split, labels_file=labels, class_names=class_names)
    # Checks that need no image come first: a folder refused for its classes opens no file.
    if expected_classes is not None and expected_classes != len(listing.classes):
        raise UserError(f"--num-classes {expected_classes} does not match the dataset's "
                        f"{len(listing.classes)} classes")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UserError(f"--workers must be 0 or more, got {workers!r}")
    threads = workers if workers else min(4, os.cpu_count() or 1)
    total = int(listing.labels.size)
    bad = np.zeros(total, dtype=bool)
    checked = np.zeros(total, dtype=bool)
    sizes = np.zeros((total, 2), dtype=np.int64)
    while True:
        # A bad image is dropped and the subset chosen again from the rest, so n_per_class /
        # limit count good images; only images that enter the subset are checked.
        good = np.flatnonzero(~bad)
        selected = good[subset_indices(listing.labels[good], limit=limit, n_per_class=n_per_class)]
        todo = selected[~checked[selected]]
        if todo.size == 0:
            break
        files = [listing.files[k] for k in todo.tolist()]
        if skip_bad_images:
            todo_bad, sizes[todo] = decode_check(files, threads)
            bad[todo[todo_bad]] = True
        else:
            sizes[todo] = header_sizes(files, threads)
        checked[todo] = True
    if selected.size == 0:
        raise UserError(f"every selected image in {folder} is unreadable ({int(bad.sum())} skipped)")
    files = [listing.files[k] for k in selected.tolist()]
    shape = common_shape(files, sizes[selected], preprocessing)
    subset = {"limit": limit, "n_per_class": n_per_class, "total_in_split": total, **listing.notes}
    if skip_bad_images:
        skipped = np.flatnonzero(bad)
        subset["skipped_bad_images"] = int(skipped.size)
        subset["skipped_files"] = [listing.files[k] for k in skipped[:SHOWN_SKIPPED].tolist()]
    return EvalData(
        name=listing.name, split=split, x=LazyImages(files, shape, preprocessing, workers=workers),
        y=torch.from_numpy(np.ascontiguousarray(listing.labels[selected], dtype=np.int64)),
        index=torch.from_numpy(selected.astype(np.int64)), classes=list(listing.classes),
        subset=subset, source=listing.source,
        preprocessing=None if preprocessing is None else preprocessing.record(resized_as="uint8"),
    )


@DATASETS.register("imagefolder", help="a folder of images: one sub-folder per class, or flat with --labels FILE")
def _imagefolder(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    raise UserError("image folders are loaded by load_dataset (lazily); pass the folder as the dataset")


# ---------------------------------------------------------------------------- the demo


@DATASETS.register("demo", help="the offline demo 'patterns' dataset (generated; 10 classes, 32x32)")
def _demo(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    from robaudit.audit.data.demo import make_demo_arrays

    _check_split("demo", split, ("train", "test"))
    images, labels, classes = make_demo_arrays(split)
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return _FullSplit("demo", labels, _array_taker(nchw), classes, "generated by robaudit (seeded)")
