"""The source papers' other datasets: MNIST, STL-10 and Tiny-ImageNet, with their defaults.

Layouts under --data-dir DIR (what torchvision's downloads, and the official archive, leave):

* `mnist`: DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision's
  MNIST folder; the .gz files beside them are read when the plain ones are missing).
  1 channel, 28x28, 10 classes. The IDX format: a big-endian header (magic 0x00000803 for
  uint8 images with 3 dimensions, 0x00000801 for labels with 1) then the raw uint8 values.
* `stl10`: DIR/stl10_binary/{train,test}_{X,y}.bin and class_names.txt (torchvision's
  STL10 folder). X holds uint8 3x96x96 images stored column-major (each channel's pixels
  column by column, as the dataset's MATLAB origin wrote them); y holds labels 1..10. The
  files are read through a memory map, so only the selected images are paged in.
  torchvision's own STL10 class refuses any copy whose md5 differs from the release,
  which is why robaudit reads the binary files itself (and uses torchvision to download).
* `tinyimagenet`: DIR/tiny-imagenet-200/ as the official zip extracts: wnids.txt,
  words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt.
  The official test set has no labels, so split "test" is the labelled val split (50
  images per class), as the ABSLD and CFA papers evaluate. Classes are the wnids sorted
  (torchvision ImageFolder's order on train/, which the public training scripts use),
  named by words.txt's first name. Images load lazily (image_folders.LazyImages).

Downloads: MNIST and STL-10 through torchvision; Tiny-ImageNet from its official URL
(TINYIMAGENET_URL). Offline, one line says what to put where.

`DATASET_DEFAULTS` records each paper dataset's threat model and settings, with sources.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from robaudit.audit.data.datasets import DATASETS, _array_taker, _check_split, _FullSplit, default_data_dir
from robaudit.audit.data.image_folders import FolderListing, is_image
from robaudit.errors import UserError

MNIST_CLASSES = [str(d) for d in range(10)]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_FOLDER = "tiny-imagenet-200"
IDX_IMAGES_MAGIC = 0x00000803   # uint8, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801   # uint8, 1 dimension (N)
STL10_SIDE = 96

# Per-dataset defaults and where each comes from. eps is in [0, 1] pixel units (L-inf);
# mean/std are the usual normalisation constants of the dataset (robaudit's own models take
# [0, 1] input; --mean/--std applies these to a model that expects them); tau_bounds are
# ABSLD's temperature bounds (remediate/distillation.py default_tau_bounds reads the same).
DATASET_DEFAULTS: Dict[str, dict] = {
    "mnist": {
        "eps": 0.3, "norm": "linf", "step_size": 0.01, "steps": 40,
        "mean": [0.1307], "std": [0.3081], "tau_bounds": None, "augment": False,
        "source": "eps 0.3, 40 steps of 0.01: Madry et al. (ICLR 2018) Sec. 5 MNIST setting, the usual "
                  "MNIST L-inf budget (the class-wise paper's own MNIST settings were not read here); "
                  "mean/std: pytorch/examples mnist/main.py; no ABSLD setting exists for MNIST; no crop/flip "
                  "(digits are not mirror-symmetric)",
    },
    "stl10": {
        "eps": 8 / 255, "norm": "linf", "step_size": 2 / 255, "steps": 10,
        "mean": [0.4467, 0.4398, 0.4066], "std": [0.2603, 0.2566, 0.2713], "tau_bounds": None,
        "augment": True,
        "source": "eps 8/255: robaudit's choice, the CIFAR budget (the class-wise paper's STL-10 budget was "
                  "not read here); mean/std: commonly used STL-10 values, not recomputed here; no ABSLD "
                  "setting exists for STL-10",
    },
    "tinyimagenet": {
        "eps": 8 / 255, "norm": "linf", "step_size": 2 / 255, "steps": 10,
        "mean": [0.4802, 0.4481, 0.3975], "std": [0.2770, 0.2691, 0.2821], "tau_bounds": (0.9, 1.1),
        "augment": True,
        "source": "eps 8/255, 10 steps of 2/255 and tau in [0.9, 1.1]: ABSLD paper Sec. 5.1 and App. A.5 "
                  "('other settings are the same as CIFAR-100'); mean/std: commonly used Tiny-ImageNet "
                  "values, not recomputed here",
    },
}


def dataset_defaults(name: Optional[str]) -> Optional[dict]:
    """The recorded defaults of a paper dataset (a copy), or None for any other name."""
    found = DATASET_DEFAULTS.get((name or "").lower())
    return None if found is None else dict(found)


def _root(data_dir) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _missing(title: str, what: str, root: Path, download: bool, err: Optional[BaseException] = None) -> UserError:
    reason = f" [{' '.join(f'{type(err).__name__}: {err}'.split())[:160]}]" if err is not None else ""
    problem = (f"could not download {title} (no network?){reason}" if download
               else f"{title} not found under {root} and download is off")
    return UserError(f"{problem}; put {what} under {root} and pass --data-dir {root}")


# ---------------------------------------------------------------------------- MNIST


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """An IDX file (plain or .gz) as a uint8 array of its declared shape; one line if malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise UserError(f"{path} is not an MNIST {what} file (IDX magic {found!r}, expected {magic})")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise UserError(f"{path} declares {count} values {list(shape)} but holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _mnist_file(raw_dir: Path, stem: str) -> Optional[Path]:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


@DATASETS.register("mnist", help="MNIST (10 digits, 1x28x28 grey; torchvision's DIR/MNIST/raw layout)")
def _mnist(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    _check_split("mnist", split, ("test", "train"))
    root = _root(data_dir)
    prefix = "train" if split == "train" else "t10k"
    raw_dir = root / "MNIST" / "raw"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if any(_mnist_file(raw_dir, s) is None for s in stems):
        what = f"MNIST/raw/{stems[0]} and {stems[1]} (or their .gz)"
        if not download:
            raise _missing("MNIST", what, root, False)
        try:
            import torchvision.datasets as tv_datasets

            tv_datasets.MNIST(str(root), train=split == "train", download=True)
        except Exception as err:  # network, disk and archive failures all end the same way
            raise _missing("MNIST", what, root, True, err) from err
    images = read_idx(_mnist_file(raw_dir, stems[0]), IDX_IMAGES_MAGIC, "images")
    labels = read_idx(_mnist_file(raw_dir, stems[1]), IDX_LABELS_MAGIC, "labels").astype(np.int64)
    if images.shape[0] != labels.size:
        raise UserError(f"{raw_dir}: {images.shape[0]} images but {labels.size} labels")
    if labels.size and labels.max() > 9:
        raise UserError(f"{raw_dir}: label {int(labels.max())} is not a digit 0-9")
    return _FullSplit("mnist", labels, _array_taker(images[:, None]), list(MNIST_CLASSES), str(root))


# ---------------------------------------------------------------------------- STL-10


def _stl10_images(path: Path) -> np.ndarray:
    """uint8 [N, 3, 96, 96] view of an STL-10 X file (memory-mapped; column-major per channel)."""
    side = STL10_SIDE
    per_image = 3 * side * side
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise UserError(f"{path} holds {size} bytes, not a whole number of 3x96x96 images")
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // per_image, 3, side, side))
    return mapped.transpose(0, 1, 3, 2)   # stored column by column: swap to rows


@DATASETS.register("stl10", help="STL-10 (10 classes, 3x96x96; torchvision's DIR/stl10_binary layout)")
def _stl10(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    _check_split("stl10", split, ("test", "train"))
    root = _root(data_dir)
    folder = root / "stl10_binary"
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    if not (x_path.is_file() and y_path.is_file()):
        what = f"stl10_binary/{x_path.name} and {y_path.name}"
        if not download:
            raise _missing("STL-10", what, root, False)
        try:
            import torchvision.datasets as tv_datasets

            tv_datasets.STL10(str(root), split=split, download=True)
        except Exception as err:
            raise _missing("STL-10", what, root, True, err) from err
    images = _stl10_images(x_path)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1    # stored as 1..10
    if labels.size != images.shape[0]:
        raise UserError(f"{folder}: {images.shape[0]} images in {x_path.name} but {labels.size} labels "
                        f"in {y_path.name}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{y_path} has labels outside 1..10")
    names_file = folder / "class_names.txt"
    classes = list(STL10_CLASSES)
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) == 10:
            classes = names
    return _FullSplit("stl10", labels, _array_taker(images), classes, str(root))


# ---------------------------------------------------------------------------- Tiny-ImageNet


def is_tinyimagenet_folder(path) -> bool:
    """True for a folder laid out as the official archive (or the folder holding it), so
    `--dataset DIR/tiny-imagenet-200` reads it as Tiny-ImageNet, not as a plain image folder."""
    folder = Path(path).expanduser()
    for candidate in (folder, folder / TINYIMAGENET_FOLDER):
        if (candidate / "wnids.txt").is_file() and (candidate / "val" / "val_annotations.txt").is_file():
            return True
    return False


def _tiny_root(data_dir, download: bool) -> Path:
    root = _root(data_dir)
    folder = root if (root / "wnids.txt").is_file() else root / TINYIMAGENET_FOLDER
    if (folder / "wnids.txt").is_file():
        return folder
    what = f"the extracted {TINYIMAGENET_URL} ({TINYIMAGENET_FOLDER}/wnids.txt, train/, val/)"
    if not download:
        raise _missing("Tiny-ImageNet", what, root, False)
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINYIMAGENET_URL, str(root))
    except Exception as err:
        raise _missing("Tiny-ImageNet", what, root, True, err) from err
    if not (root / TINYIMAGENET_FOLDER / "wnids.txt").is_file():
        raise _missing("Tiny-ImageNet", what, root, True)
    return root / TINYIMAGENET_FOLDER


def _words(folder: Path, wnids: List[str]) -> List[str]:
    """words.txt's first name per wnid ("n01443537<TAB>goldfish, Carassius auratus"); the
    wnid itself where words.txt is absent or silent, and the wnid added where a name repeats."""
    names: Dict[str, str] = {}
    words = folder / "words.txt"
    if words.is_file():
        for line in words.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid.strip() and text.strip():
                names[wnid.strip()] = text.split(",")[0].strip()
    first = [names.get(w, w) for w in wnids]
    counts: Dict[str, int] = {}
    for name in first:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name} ({wnid})" for wnid, name in zip(wnids, first)]


def _tiny_val(folder: Path, index: Dict[str, int]) -> Tuple[List[str], List[int]]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"{annotations} is missing; the labelled split of Tiny-ImageNet is val/ with it")
    files, labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise UserError(f"{annotations} line {number}: expected FILE<TAB>WNID with a wnid of wnids.txt")
        path = folder / "val" / "images" / fields[0].strip()
        if not is_image(path):
            raise UserError(f"{annotations} line {number} names {path}, which is not an image file")
        files.append(str(path.resolve()))
        labels.append(index[fields[1].strip()])
    order = sorted(range(len(files)), key=files.__getitem__)   # dataset order: by file name
    return [files[k] for k in order], [labels[k] for k in order]


def tinyimagenet_listing(split: str, data_dir=None, download: bool = True) -> FolderListing:
    """Tiny-ImageNet's files and labels for `split` (train, or test = the labelled val split)."""
    _check_split("tinyimagenet", split, ("test", "train"))
    folder = _tiny_root(data_dir, download).resolve()
    wnids = sorted({w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip()})
    if not wnids:
        raise UserError(f"{folder / 'wnids.txt'} lists no classes")
    index = {wnid: k for k, wnid in enumerate(wnids)}
    if split == "train":
        files, labels = [], []
        for wnid in wnids:
            images_dir = folder / "train" / wnid / "images"
            if not images_dir.is_dir():
                raise UserError(f"{images_dir} is missing; Tiny-ImageNet's train split is train/<wnid>/images/")
            found = sorted(str(p) for p in images_dir.iterdir() if is_image(p))
            files.extend(found)
            labels.extend([index[wnid]] * len(found))
    else:
        files, labels = _tiny_val(folder, index)
    if not files:
        raise UserError(f"{folder} has no {split} images")
    notes = {"layout": "tiny-imagenet-200", "split_read": "val (labelled)" if split == "test" else "train"}
    return FolderListing("tinyimagenet", files, np.asarray(labels, dtype=np.int64), _words(folder, wnids),
                         str(folder), notes)


@DATASETS.register("tinyimagenet", help="Tiny-ImageNet (200 classes, 64x64; the official "
                                        "tiny-imagenet-200 folder; test = its labelled val split)")
def _tinyimagenet(*, split: str, data_dir=None, download: bool = True) -> _FullSplit:
    raise UserError("Tiny-ImageNet is loaded by load_dataset (lazily)")


# Registered names whose files load lazily: name -> listing function (load_dataset reads it).
LAZY_LISTINGS: Dict[str, Callable[..., FolderListing]] = {"tinyimagenet": tinyimagenet_listing}
