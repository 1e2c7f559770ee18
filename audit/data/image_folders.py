"""Image folders as lazily decoded datasets: listing, labels files, class names, `LazyImages`.

Layouts (`list_image_folder`):
- DIR/<class>/<images> (DIR/test/... and DIR/train/... for two splits): one folder per class,
  ImageNet's synset folders (n01440764/...) included; classes = sorted folder names, as
  torchvision's ImageFolder and ImageNet's class indices order them;
- the validation layout: a flat DIR of images plus `labels_file`, either ImageNet's
  LOC_val_solution.csv (header `ImageId,PredictionString`; the prediction string starts with
  the synset id; ImageId has no extension) or a `label<TAB>file` list (label: class index or
  class name). Classes = the sorted distinct labels of the whole file (all 1000 synsets for
  ImageNet's file, so a subset folder keeps ImageNet's indices).
`class_names` (`--class-names`): LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca"; the
file's order becomes the class order and the first comma-separated name the class name), or
one name per line (or a JSON list) in class-index order.

Only the file list and labels are held: `LazyImages` decodes the files it is indexed with
(PIL, then audit/data/preprocessing.py) and `stream_batches` decodes chunks ahead in DataLoader
workers. Bad images: every selected file's header is read up front (cheap: ~0.04 ms a file,
it catches non-images and unknown formats, naming the file); truncated or corrupt pixel
data only shows when decoding, so without `skip_bad_images` the scan stops at the first
such file with one line naming it (the engine has then written only its resumable
OUT/.robaudit-state chunks, never results.json or the report). With `skip_bad_images` every
selected file is fully decoded once up front, in threads (PIL decodes without the GIL),
and the bad ones are dropped; JPEGs are decoded at 1/8 scale for that check (`draft`),
which still reads all of the compressed data, about 1.5x faster than a full decode.

Images that cannot be decoded safely all get the same treatment (one line naming the file
and exit 2; dropped and counted with skip_bad_images): unknown format, empty or zero-sized
(width or height 0), truncated or corrupt, and over the pixel limit. The pixel limit is
PIL's own `Image.MAX_IMAGE_PIXELS`, read when each file is opened: 89,478,485 pixels by
default (0.25 GiB as 24-bit RGB, e.g. 9459x9459). It is kept because it is far above the
images audits use (CIFAR's 32x32, ImageNet photos of a few hundred pixels a side, all resized
to the model's input anyway), while a 50 kB PNG claiming 20000x20000 would decode to 1.2 GB
of RGB in every decode worker; a program that embeds robaudit and changed the limit gets its
own value. PIL raises DecompressionBombError only above twice the limit and merely warns between
1x and 2x; here anything above 1x is refused, checked from the header before any pixel is
decoded (`_open_checked`), and PIL's warning is turned into an error for PIL.Image so the
band never prints a warning either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from robaudit.audit.data.preprocessing import Preprocessing
from robaudit.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
SYNSET_LINE = re.compile(r"^(n\d{8})\s+(\S.*)$")
SHOWN_SKIPPED = 20      # skipped file names kept for results.json (the count is exact)
CHECK_CHUNK = 64        # files per task of the up-front checks


@dataclass
class FolderListing:
    """An image folder's split before subsetting: files and labels only."""

    name: str
    files: List[str]                 # absolute paths, dataset order
    labels: np.ndarray               # int64 [N]
    classes: List[str]               # display names, label order
    source: str
    notes: dict = field(default_factory=dict)   # goes into EvalData.subset (labels file, counts)


# ------------------------------------------------------------------------------- listing


def is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dir(root: Path, split: str) -> Path:
    train_dir, test_dir = root / "train", root / "test"
    has_train, has_test = train_dir.is_dir(), test_dir.is_dir()
    if split == "train":
        if not has_train:
            raise UserError(f"{root} has no training split; add {train_dir}/<class>/<images> "
                            f"(and put the test images under {test_dir}/<class>/)")
        return train_dir
    if split == "test":
        if has_train and not has_test:
            raise UserError(f"{root} has a train/ folder but no test/ folder; add {test_dir}/<class>/<images>")
        if has_train and has_test and _class_dirs(train_dir) != _class_dirs(test_dir):
            raise UserError(f"{train_dir} and {test_dir} have different class folders; "
                            f"both splits need the same classes")
        return test_dir if has_test else root
    raise UserError(f"{root} has no {split!r} split; image folders offer test and train")


def list_image_folder(root: Path, split: str = "test", labels_file=None,
                      class_names=None) -> FolderListing:
    """The files and labels of `root` (see the module docstring for the layouts)."""
    root = root.expanduser().resolve()
    notes: dict = {}
    if labels_file is not None:
        if split != "test":
            raise UserError(f"--labels describes the audited (test) split; {split!r} needs "
                            f"{root}/{split}/<class>/<images>")
        files, raw_labels, numeric, all_ids = _read_labels_file(Path(labels_file).expanduser(), root, notes)
        notes["labels_file"] = str(Path(labels_file).expanduser().resolve())
    else:
        split_dir = _split_dir(root, split)
        all_ids = _class_dirs(split_dir)
        if not all_ids:
            raise UserError(f"{split_dir} has no class sub-folders; expected {split_dir}/<class>/<images>, "
                            f"or a flat folder of images with --labels FILE")
        files, raw_labels = [], []
        for class_id in all_ids:
            class_files = sorted(str(p) for p in (split_dir / class_id).iterdir() if is_image(p))
            files.extend(class_files)
            raw_labels.extend([class_id] * len(class_files))
        numeric = False
        if not files:
            raise UserError(f"{split_dir} has class folders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    labels, classes = _resolve_classes(raw_labels, all_ids, numeric, class_names, notes)
    return FolderListing(root.name, files, labels, classes, str(root), notes)


def _read_labels_file(path: Path, root: Path, notes: dict):
    """(files, raw labels, labels are indices?, class ids) of the images in `root` that the file labels."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"--labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --labels {path}: {getattr(err, 'strerror', None) or err}") from None
    rows = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise UserError(f"--labels {path} is empty")
    entries: List[Tuple[str, str]] = []          # (file key, label)
    if rows[0][1].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for number, line in rows[1:]:
            image_id, _, prediction = line.partition(",")
            fields = prediction.split()
            if not image_id.strip() or not fields:
                raise UserError(f"--labels {path} line {number}: expected ImageId,PredictionString "
                                f"(e.g. ILSVRC2012_val_00000001,n01751748 111 222 333 444)")
            entries.append((image_id.strip(), fields[0]))
    else:
        for number, line in rows:
            label, tab, name = line.partition("\t")
            if not tab or not label.strip() or not name.strip():
                raise UserError(f"--labels {path} line {number}: expected label<TAB>file "
                                f"(label: a class index or name), or ImageNet's LOC_val_solution.csv")
            entries.append((name.strip(), label.strip()))
    numeric = all(re.fullmatch(r"-?\d+", label) for _, label in entries)   # int() reads them ("²", "--1" no)
    if numeric and any(int(label) < 0 for _, label in entries):
        raise UserError(f"--labels {path} has a negative class index")
    all_ids = None if numeric else sorted({label for _, label in entries})

    # images of the folder by name and by stem (ImageNet's CSV names files without extension)
    top_images = [p for p in root.iterdir() if is_image(p)]
    by_name = {}
    for image in top_images:
        by_name.setdefault(image.name, str(image))
        by_name.setdefault(image.stem, str(image))
    files, labels, seen = [], [], set()
    for key, label in entries:
        found = by_name.get(key)
        if found is None and "/" in key and is_image(root / key):
            found = str((root / key).resolve())
        if found is None or found in seen:
            continue
        seen.add(found)
        files.append(found)
        labels.append(label)
    if not files:
        raise UserError(f"none of the {len(entries)} images named in --labels {path} is in {root}")
    order = sorted(range(len(files)), key=files.__getitem__)   # dataset order: by file name
    files, labels = [files[k] for k in order], [labels[k] for k in order]
    notes["labels_without_image"] = len(entries) - len(files)
    notes["images_without_label"] = len({str(p) for p in top_images} - seen)
    return files, labels, numeric, all_ids


def _names_in_file(path) -> Tuple[str, List[str]]:
    from robaudit.audit.data.class_maps import read_text

    text = read_text(path, "--class-names")
    return text, [line.strip() for line in text.splitlines() if line.strip()]


def _synset_mapping(lines: Sequence[str]) -> Optional[List[Tuple[str, str]]]:
    """[(synset id, first name)] when every line is "nXXXXXXXX name, other names", else None."""
    matches = [SYNSET_LINE.match(line) for line in lines]
    if not lines or not all(matches):
        return None
    return [(m.group(1), m.group(2).split(",")[0].strip()) for m in matches]


def _unique_names(pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """First names, with the synset id added where a name repeats (ImageNet has two 'crane's)."""
    counts: dict = {}
    for _, name in pairs:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name} ({synset})" for synset, name in pairs]


def _resolve_classes(raw_labels, all_ids, numeric: bool, class_names, notes: dict):
    """(int64 labels, display class names) from raw labels (ids or indices) and --class-names."""
    if class_names is None:
        if numeric:
            values = np.asarray([int(v) for v in raw_labels], dtype=np.int64)
            return values, [str(k) for k in range(int(values.max()) + 1)]
        lookup = {class_id: k for k, class_id in enumerate(all_ids)}
        return np.asarray([lookup[v] for v in raw_labels], dtype=np.int64), list(all_ids)

    notes["class_names_file"] = str(Path(class_names).expanduser().resolve())
    text, lines = _names_in_file(class_names)
    mapping = _synset_mapping(lines)
    if mapping is not None:
        ids = [synset for synset, _ in mapping]
        if len(set(ids)) != len(ids):
            repeated = next(i for i in ids if ids.count(i) > 1)
            raise UserError(f"--class-names {class_names} lists synset {repeated} more than once")
        names = _unique_names(mapping)
        if numeric:
            values = np.asarray([int(v) for v in raw_labels], dtype=np.int64)
            if int(values.max()) >= len(names):
                raise UserError(f"the labels go up to class {int(values.max())} but --class-names "
                                f"{class_names} lists {len(names)} synsets")
            return values, names
        position = {synset: k for k, synset in enumerate(ids)}
        missing = [class_id for class_id in all_ids if class_id not in position]
        if missing:
            raise UserError(f"class {missing[0]!r} is not in --class-names {class_names} "
                            f"({len(missing)} of the data's {len(all_ids)} classes are missing); "
                            f"give the synset mapping the data's classes come from")
        return np.asarray([position[v] for v in raw_labels], dtype=np.int64), names

    from robaudit.audit.data.class_maps import parse_class_names, read_class_names

    if numeric:
        values = np.asarray([int(v) for v in raw_labels], dtype=np.int64)
        count = len(parse_class_names(text, class_names))
        if int(values.max()) >= count:
            raise UserError(f"the labels go up to class {int(values.max())} but --class-names "
                            f"{class_names} lists {count} names")
        return values, read_class_names(os.fspath(class_names), [str(k) for k in range(count)])
    lookup = {class_id: k for k, class_id in enumerate(all_ids)}
    names = read_class_names(os.fspath(class_names), list(all_ids))   # count and duplicates checked there
    return np.asarray([lookup[v] for v in raw_labels], dtype=np.int64), names


# ------------------------------------------------------------------------------- checks


class BadImage(Exception):
    """A file that is no image robaudit will decode: `reason` says why, in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _open_checked(path: str):
    """PIL's image of `path` (header read, nothing decoded), or BadImage: unreadable, unknown
    format, zero-sized, or over the pixel limit (module docstring)."""
    from PIL import Image

    # Idempotent (filterwarnings drops an equal entry before inserting it) and set on each open
    # because test runners and embedding programs reset the warning filters.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning, module=r"PIL\.Image")
    # A TIFF whose tags are cut short or corrupt ("Truncated File Read", "Corrupt EXIF data") is
    # warned about while its header is read; its pixels are checked when decoded (a short strip
    # raises), so the warning only adds lines to the one-line contract of the command.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
    try:
        image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"over the {Image.MAX_IMAGE_PIXELS:,}-pixel limit: {err}") from None
    except Exception as err:  # OSError, UnidentifiedImageError, SyntaxError, ValueError, ... from plugins
        raise BadImage(f"{type(err).__name__}: {' '.join(str(err).split())[:160]}") from None
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if width <= 0 or height <= 0:
        image.close()
        raise BadImage(f"zero-sized ({width}x{height})")
    if limit is not None and width * height > limit:
        image.close()
        raise BadImage(f"{width}x{height} = {width * height:,} pixels, over the {limit:,}-pixel limit")
    return image


def _header_size(path: str) -> Tuple[int, int]:
    try:
        with _open_checked(path) as image:
            width, height = image.size
    except BadImage as err:
        raise UserError(f"cannot read image {path} ({err.reason}); fix or remove it, "
                        f"or pass --skip-bad-images") from None
    return height, width


def _decodes(path: str) -> Optional[Tuple[int, int]]:
    """(H, W) if the whole file decodes, else None."""
    try:
        with _open_checked(path) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except Exception:  # BadImage, or any failure to decode: a bad image here, whatever PIL raises
        return None
    return height, width


def _map_chunks(function, files: Sequence[str], workers: int) -> list:
    chunks = [files[start:start + CHECK_CHUNK] for start in range(0, len(files), CHECK_CHUNK)]
    run_chunk = lambda chunk: [function(f) for f in chunk]  # noqa: E731
    if workers <= 1 or len(chunks) <= 1:
        return [r for chunk in chunks for r in run_chunk(chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(run_chunk, chunks) for r in part]


def header_sizes(files: Sequence[str], workers: int = 1) -> np.ndarray:
    """int64 [N, 2] (H, W) from each file's header; a file that is no readable image raises, named."""
    sizes = _map_chunks(_header_size, files, workers)
    return np.asarray(sizes, dtype=np.int64).reshape(-1, 2)


def decode_check(files: Sequence[str], workers: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """(bad bool [N], sizes int64 [N, 2]) after decoding every file once."""
    results = _map_chunks(_decodes, files, workers)
    bad = np.asarray([r is None for r in results], dtype=bool)
    sizes = np.asarray([r if r is not None else (0, 0) for r in results], dtype=np.int64).reshape(-1, 2)
    return bad, sizes


def common_shape(files: Sequence[str], sizes: np.ndarray, preprocessing: Optional[Preprocessing]):
    """(3, H, W) every image has after preprocessing, or one line saying what to pass."""
    if preprocessing is not None:
        smallest = int(np.argmin(sizes.min(axis=1)))
        preprocessing.check_fits(int(sizes[smallest, 0]), int(sizes[smallest, 1]), files[smallest])
        out = np.asarray([preprocessing.output_size(int(h), int(w)) for h, w in sizes], dtype=np.int64) \
            if preprocessing.center_crop is None else np.tile([preprocessing.center_crop] * 2, (len(files), 1))
    else:
        out = sizes
    differ = np.flatnonzero((out != out[0]).any(axis=1))
    if differ.size:
        k = int(differ[0])
        after = f" after --resize {preprocessing.resize}" if preprocessing is not None else ""
        raise UserError(f"{files[k]} is {out[k, 1]}x{out[k, 0]}{after} but {files[0]} is "
                        f"{out[0, 1]}x{out[0, 0]}; images must share one size: pass --center-crop M "
                        f"(e.g. --resize 256 --center-crop 224)")
    return 3, int(out[0, 0]), int(out[0, 1])


# ------------------------------------------------------------------------------- lazy images


def decode_image(path: str, preprocessing: Optional[Preprocessing]) -> torch.Tensor:
    """One file -> uint8 [3, H, W] after preprocessing; an unreadable file raises, named."""
    try:
        with _open_checked(path) as image:
            rgb = np.array(image.convert("RGB"), dtype=np.uint8)  # writable copy for torch
    except BadImage as err:
        raise UserError(f"cannot decode image {path} ({err.reason}); fix or remove it, "
                        f"or pass --skip-bad-images") from None
    except Exception as err:  # truncated or corrupt data surfaces here, with PIL's many error types
        reason = " ".join(str(err).split())[:160]   # one line, whatever PIL put in the message
        raise UserError(f"cannot decode image {path} ({type(err).__name__}: {reason}); fix or remove it, "
                        f"or pass --skip-bad-images") from None
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    return chw if preprocessing is None else preprocessing.apply(chw)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]: the one conversion, so streamed and indexed batches agree exactly."""
    return images_uint8.to(torch.float32).div_(255.0)


class LazyImages:
    """The read-only part of a float32 [N, 3, H, W] CPU tensor in [0, 1], decoded on indexing.

    `len(x)`, `x.shape`, `x.dtype`, `x.device`, `x.ndim`, `x[idx]` (int, slice, LongTensor,
    numpy int or bool array, list) -> float32 tensor, `x.take_uint8(positions)`, and
    `x.fingerprint()`: a hash of the files (resolved paths, byte sizes, mtimes) and the
    preprocessing, the resume key in place of hashing all pixels. `x.workers`: how many
    decode workers `stream_batches` uses by default (--workers).
    """

    dtype = torch.float32
    device = torch.device("cpu")
    ndim = 4

    def __init__(self, files: Sequence[str], image_shape: Tuple[int, int, int],
                 preprocessing: Optional[Preprocessing] = None, workers: Optional[int] = None):
        self.files = list(files)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.preprocessing = preprocessing
        self.workers = workers   # stream_batches' default number of decode workers (None: min(4, cpus))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), *self.image_shape))

    def dim(self) -> int:
        return 4

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def _positions(self, idx) -> Tuple[np.ndarray, bool]:
        if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
            position = int(idx) + (len(self) if int(idx) < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"index {int(idx)} is out of range for {len(self)} images")
            return np.asarray([position], dtype=np.int64), True
        if isinstance(idx, slice):
            return np.arange(len(self), dtype=np.int64)[idx], False
        positions = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        if positions.dtype == np.bool_:
            if positions.shape != (len(self),):
                raise IndexError(f"a boolean mask must have {len(self)} entries, got {positions.shape}")
            return np.flatnonzero(positions).astype(np.int64), False
        if positions.size and not np.issubdtype(positions.dtype, np.integer):
            raise IndexError(f"images are indexed by integers, got {positions.dtype}")
        positions = positions.astype(np.int64).reshape(-1)
        positions = np.where(positions < 0, positions + len(self), positions)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return positions, False

    def take_uint8(self, positions: Iterable[int]) -> torch.Tensor:
        """uint8 [k, 3, H, W] of the files at `positions` (decoded now, in this process)."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = torch.empty((positions.size, *self.image_shape), dtype=torch.uint8)
        # one file at a time: decoding is per file by nature; the preprocessing inside is vectorised
        for row, position in enumerate(positions.tolist()):
            image = decode_image(self.files[position], self.preprocessing)
            if tuple(image.shape) != self.image_shape:
                raise UserError(f"{self.files[position]} decodes to {list(image.shape)} but its header "
                                f"promised {list(self.image_shape)}; pass --center-crop M")
            out[row] = image
        return out

    def __getitem__(self, idx) -> torch.Tensor:
        positions, single = self._positions(idx)
        images = to_float(self.take_uint8(positions))
        return images[0] if single else images

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        record = self.preprocessing.record() if self.preprocessing is not None else None
        digest.update(json.dumps({"shape": list(self.image_shape), "preprocessing": record},
                                 sort_keys=True).encode())
        for path in self.files:
            stat = os.stat(path)
            digest.update(f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} files, shape={list(self.shape)})"


class _BatchDecode(torch.utils.data.Dataset):
    """Item i = the uint8 images of position batch i; a bad file comes back as its error line."""

    def __init__(self, images: LazyImages, batches: Sequence[np.ndarray]):
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        try:
            return self.images.take_uint8(self.batches[i])
        except UserError as err:   # re-raised as one line in the main process (not a worker traceback)
            return str(err)


def default_workers(x) -> int:
    """Decode workers: x.workers, else min(4, cpu count), for lazy images; 0 for in-memory tensors."""
    if not isinstance(x, LazyImages):
        return 0
    return x.workers if x.workers is not None else min(4, os.cpu_count() or 1)


def stream_batches(x, positions_batches: Sequence, num_workers: Optional[int] = None,
                   prefetch_factor: int = 2) -> Iterator[torch.Tensor]:
    """float32 x[positions] for each batch of positions, in order.

    Lazy images with workers: a DataLoader whose items are whole batches, decoded in
    `num_workers` processes, at most num_workers * prefetch_factor batches ahead (as uint8,
    converted here), pin_memory off. In-memory tensors (or num_workers=0): plain indexing.
    """
    batches = [np.asarray(p.cpu().numpy() if isinstance(p, torch.Tensor) else p, dtype=np.int64).reshape(-1)
               for p in positions_batches]
    if num_workers is None:
        num_workers = default_workers(x)
    if not isinstance(x, LazyImages) or num_workers <= 0 or len(batches) <= 1:
        for positions in batches:
            yield x[torch.from_numpy(positions)]
        return
    loader = torch.utils.data.DataLoader(_BatchDecode(x, batches), batch_size=None, shuffle=False,
                                         num_workers=min(num_workers, len(batches)),
                                         prefetch_factor=prefetch_factor, pin_memory=False)
    for item in loader:
        if isinstance(item, str):
            raise UserError(item)
        yield to_float(item)
