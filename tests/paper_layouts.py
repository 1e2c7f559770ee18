"""Tiny generated copies of the paper datasets' on-disk layouts (MNIST, STL-10, Tiny-ImageNet).

Written exactly as torchvision's downloads and the official archive leave them, so the
readers are tested on the real layouts (and cross-checked against torchvision's own
readers where those accept non-release files).
"""

from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: magic (0, 0, dtype code 0x08 = uint8, ndim), big-endian int32 dims, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def mnist_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, labels


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0):
    """DIR/MNIST/raw/{train,t10k}-*-ubyte; returns {split: (images, labels)}."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = mnist_arrays(n, seed + (split == "test"))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[split] = (images, labels)
    return written


def write_stl10(root: Path, n_train: int = 10, n_test: int = 10, seed: int = 0, side: int = 96):
    """DIR/stl10_binary/{train,test}_{X,y}.bin (+ class_names.txt); returns {split: (NCHW images, labels 0..9)}."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rng = np.random.default_rng(seed + (split == "test"))
        images = rng.integers(0, 256, size=(n, 3, side, side), dtype=np.uint8)   # NCHW, row-major
        labels = np.arange(n, dtype=np.uint8) % 10
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")         # stored column-major
        (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")         # stored as 1..10
        written[split] = (images, labels.astype(np.int64))
    (folder / "class_names.txt").write_text(
        "\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    return written


# wnids listed out of order (the official wnids.txt is not sorted); the class order is sorted.
TINY_WNIDS = ["n09999999", "n01443537", "n02124075", "n01629819"]
TINY_WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
              "n02124075": "Egyptian cat", "n09999999": "goldfish"}


def write_tinyimagenet(root: Path, per_class_train: int = 3, per_class_val: int = 2, side: int = 64,
                       wnids=TINY_WNIDS, seed: int = 0) -> Path:
    """DIR/tiny-imagenet-200/ as the official zip extracts (JPEG files); returns that folder."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = [f"{w}\t{TINY_WORDS.get(w, w)}" for w in wnids] + ["n00000001\tunused entity"]
    (folder / "words.txt").write_text("\n".join(words) + "\n")
    annotations = []
    val_number = 0
    for k, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        boxes = []
        for j in range(per_class_train):
            pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            name = f"{wnid}_{j}.JPEG"
            Image.fromarray(pixels).save(images_dir / name, format="JPEG")
            boxes.append(f"{name}\t0\t0\t{side - 1}\t{side - 1}")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for j in range(per_class_val):
            pixels = rng.integers(0, 256, size=(side, side), dtype=np.uint8)   # grey JPEGs exist in the val set
            name = f"val_{val_number}.JPEG"
            Image.fromarray(pixels).save(folder / "val" / "images" / name, format="JPEG")
            annotations.append(f"{name}\t{wnid}\t0\t0\t{side - 1}\t{side - 1}")
            val_number += 1
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return folder
