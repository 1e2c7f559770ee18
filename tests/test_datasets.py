"""Dataset loading on tiny synthetic .npz files and image folders built in tmp_path."""

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from robaudit.audit.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    EvalData,
    list_datasets,
    load_dataset,
    subset_indices,
)
from robaudit.errors import UserError

SHARED_CIFAR_SUBSET = Path(__file__).parents[1].parent / "shared/data/cifar10_subset.npz"

# Labels in a fixed, interleaved order so subset rules have something to get wrong.
LABELS = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0], dtype=np.int64)


def make_images(n, height=4, width=5, seed=0):
    """uint8 NHWC images; width != height so a transposed layout would show."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_registry_lists_builtin_datasets():
    assert {"cifar10", "cifar100", "svhn", "npz", "imagefolder"} <= set(list_datasets())
    assert len(CIFAR100_CLASSES) == 100 and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)


def test_uint8_nhwc_and_float_nchw_give_identical_tensors(tmp_path):
    images = make_images(len(LABELS))
    as_float_nchw = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    variants = {
        "u8_nhwc": images,
        "f32_nchw": as_float_nchw,
        "f32_nhwc": as_float_nchw.transpose(0, 2, 3, 1),
        "u8_nchw": images.transpose(0, 3, 1, 2),
        "f64_nchw": as_float_nchw.astype(np.float64),
    }
    loaded = {name: load_dataset(save_npz(tmp_path / f"{name}.npz", x_test=x, y_test=LABELS))
              for name, x in variants.items()}
    reference = loaded["u8_nhwc"]
    assert reference.x.shape == (12, 3, 4, 5)
    assert reference.x.dtype == torch.float32 and reference.x.is_contiguous()
    assert reference.y.dtype == torch.int64 and reference.index.dtype == torch.int64
    assert float(reference.x.min()) >= 0.0 and float(reference.x.max()) <= 1.0
    # Exact on any machine: a division by 255 and dtype casts are correctly rounded IEEE
    # operations, whatever the kernel (no reductions, no order of operations to differ).
    for name, data in loaded.items():
        assert torch.equal(data.x, reference.x), name
    assert torch.equal(reference.x, torch.from_numpy(as_float_nchw))


def test_ambiguous_layout_follows_dtype_convention(tmp_path):
    # 3x3 RGB images: both axis 1 and axis 3 have 3 entries.
    images = make_images(4, height=3, width=3)
    from_uint8 = load_dataset(save_npz(tmp_path / "u8.npz", x=images, y=np.arange(4) % 2))
    from_float = load_dataset(save_npz(tmp_path / "f.npz", x=images.transpose(0, 3, 1, 2) / 255.0,
                                       y=np.arange(4) % 2))
    assert torch.equal(from_uint8.x, from_float.x)


def test_grayscale_nhw_becomes_one_channel(tmp_path):
    data = load_dataset(save_npz(tmp_path / "g.npz", x=np.zeros((3, 6, 6), np.uint8), y=np.arange(3)))
    assert data.x.shape == (3, 1, 6, 6)


def test_subset_indices_rules():
    assert subset_indices(LABELS, n_per_class=2).tolist() == [0, 1, 2, 3, 4, 6]
    assert subset_indices(LABELS, limit=5).tolist() == [0, 1, 2, 3, 4]
    assert subset_indices(LABELS, n_per_class=2, limit=4).tolist() == [0, 1, 2, 3]
    assert subset_indices(LABELS, n_per_class=100).tolist() == list(range(12))
    assert subset_indices(LABELS).tolist() == list(range(12))


def test_subsets_pick_expected_samples_and_record_them(tmp_path):
    images = make_images(len(LABELS))
    path = save_npz(tmp_path / "d.npz", x_test=images, y_test=LABELS)
    full = load_dataset(path)
    data = load_dataset(path, n_per_class=3, limit=7)
    expected = [0, 1, 2, 3, 4, 5, 6]
    assert data.index.tolist() == expected
    assert data.y.tolist() == LABELS[expected].tolist()
    assert torch.equal(data.x, full.x[expected])
    assert data.subset == {"limit": 7, "n_per_class": 3, "total_in_split": 12}
    per_class = load_dataset(path, n_per_class=1)
    assert per_class.index.tolist() == [0, 1, 2] and per_class.y.tolist() == [2, 0, 1]
    assert full.subset == {"limit": None, "n_per_class": None, "total_in_split": 12}


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_subset_sizes_must_be_positive_integers(tmp_path, bad):
    path = save_npz(tmp_path / "d.npz", x=make_images(3), y=np.arange(3))
    with pytest.raises(UserError, match="positive integer"):
        load_dataset(path, limit=bad)


def test_npz_class_names_and_train_split(tmp_path):
    path = save_npz(tmp_path / "pets.npz", x_test=make_images(4), y_test=np.array([0, 1, 2, 1]),
                    x_train=make_images(6, seed=1), y_train=np.array([0, 1, 2, 0, 1, 2]),
                    class_names=np.array(["cat", "dog", "frog"]))
    test = load_dataset(path)
    train = load_dataset(path, split="train")
    assert isinstance(test, EvalData)
    assert test.name == "pets" and test.classes == ["cat", "dog", "frog"]
    assert test.source == str(path.resolve()) and test.split == "test"
    assert len(train.y) == 6 and train.classes == test.classes and train.split == "train"
    assert load_dataset("npz", data_dir=path).classes == ["cat", "dog", "frog"]


def test_npz_class_names_from_known_dataset_stem(tmp_path):
    ten = np.arange(10)
    cifar = load_dataset(save_npz(tmp_path / "cifar10_mine.npz", x=make_images(10), y=ten))
    assert cifar.name == "cifar10" and cifar.classes == CIFAR10_CLASSES
    hundred = load_dataset(save_npz(tmp_path / "cifar100_mine.npz", x=make_images(100), y=np.arange(100)))
    assert hundred.name == "cifar100" and hundred.classes == CIFAR100_CLASSES
    # Stem says cifar10 but only 3 classes: generic names, the stem as name.
    other = load_dataset(save_npz(tmp_path / "cifar10_three.npz", x=make_images(3), y=np.arange(3)))
    assert other.name == "cifar10_three" and other.classes == ["0", "1", "2"]


def test_named_torchvision_dataset_read_from_npz(tmp_path):
    path = save_npz(tmp_path / "whatever.npz", x_test=make_images(4), y_test=np.array([0, 3, 9, 3]))
    data = load_dataset("cifar10", data_dir=path)
    assert data.name == "cifar10" and data.classes == CIFAR10_CLASSES and data.source == str(path.resolve())
    with pytest.raises(UserError, match="only 10 classes"):
        load_dataset("cifar10", data_dir=save_npz(tmp_path / "w.npz", x=make_images(2), y=np.array([0, 10])))


@pytest.mark.parametrize("arrays,message", [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "no x_test/y_test"),
    ({"x_test": np.zeros((2, 4, 4, 3), np.uint8)}, "no y_test"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, -1])}, "negative labels"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0.0, 1.0])}, "integer class indices"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 1, 1])}, "2 images but y has 3"),
    ({"x": np.full((2, 3, 4, 4), 2.0), "y": np.array([0, 1])}, "expected \\[0, 1\\]"),
    ({"x": np.full((2, 3, 4, 4), np.nan), "y": np.array([0, 1])}, "NaN"),
    ({"x": np.full((2, 3, 4, 4), 300, np.int32), "y": np.array([0, 1])}, "0..255"),
    ({"x": np.zeros((2, 5, 4, 4), np.uint8), "y": np.array([0, 1])}, "channel axis"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 2]),
      "class_names": np.array(["a", "b"])}, "only 2 classes"),
])
def test_bad_npz_contents_raise_one_line_user_errors(tmp_path, arrays, message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message) as err:
        load_dataset(path)
    assert "\n" not in str(err.value)


def test_missing_splits_files_and_unknown_names(tmp_path):
    path = save_npz(tmp_path / "only_test.npz", x=make_images(2), y=np.array([0, 1]))
    with pytest.raises(UserError, match="has no training split"):
        load_dataset(path, split="train")
    with pytest.raises(UserError, match="no such .npz file"):
        load_dataset(tmp_path / "absent.npz")
    with pytest.raises(UserError, match="unknown dataset 'imagenet7'.*cifar10"):
        load_dataset("imagenet7")
    not_npz = tmp_path / "notes.txt"
    not_npz.write_text("hello")
    with pytest.raises(UserError, match="cannot read"):
        load_dataset(not_npz)


def write_image_folder(root, class_images):
    from PIL import Image

    for class_name, images in class_images.items():
        (root / class_name).mkdir(parents=True)
        for k, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / class_name / f"img{k}.png")


def test_imagefolder_flat_directory(tmp_path):
    images = make_images(5)
    write_image_folder(tmp_path / "pets", {"dog": images[:2], "cat": images[2:]})
    data = load_dataset(tmp_path / "pets")
    assert data.classes == ["cat", "dog"] and data.name == "pets"
    assert data.y.tolist() == [0, 0, 0, 1, 1]
    expected = np.concatenate([images[2:], images[:2]]).transpose(0, 3, 1, 2) / np.float32(255)
    # image folders load lazily: x[:] decodes every file
    assert tuple(data.x.shape) == (5, 3, 4, 5)
    assert torch.equal(data.x[:], torch.from_numpy(expected.astype(np.float32)))
    subset = load_dataset("imagefolder", data_dir=tmp_path / "pets", n_per_class=1)
    assert subset.index.tolist() == [0, 3] and torch.equal(subset.x[:], data.x[[0, 3]])
    with pytest.raises(UserError, match="has no training split"):
        load_dataset(tmp_path / "pets", split="train")


def test_imagefolder_with_test_and_train_splits(tmp_path):
    write_image_folder(tmp_path / "d" / "test", {"a": make_images(1), "b": make_images(2)})
    write_image_folder(tmp_path / "d" / "train", {"a": make_images(3), "b": make_images(1)})
    assert load_dataset(tmp_path / "d").y.tolist() == [0, 1, 1]
    assert load_dataset(tmp_path / "d", split="train").y.tolist() == [0, 0, 0, 1]


def test_imagefolder_mixed_sizes_name_the_file(tmp_path):
    write_image_folder(tmp_path / "m", {"a": make_images(2, 4, 5), "b": make_images(1, 6, 6)})
    with pytest.raises(UserError, match=r"img0\.png is 6x6 but .*img0\.png is 5x4.*pass --center-crop"):
        load_dataset(tmp_path / "m")


def no_network(*args, **kwargs):
    raise urllib.error.URLError("no network in tests")


def test_offline_torchvision_download_says_how_to_supply_data(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "could not download CIFAR-10" in message
    assert f"put cifar-10-batches-py under {tmp_path} and pass --data-dir {tmp_path}" in message
    assert ".npz" in message

    monkeypatch.setenv("ROBAUDIT_DATA", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=f"cifar-100-python under {tmp_path / 'cache'}"):
        load_dataset("cifar100", split="train")
    with pytest.raises(UserError, match="not found under .* download is off"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    with pytest.raises(UserError, match="no 'val' split"):
        load_dataset("cifar10", split="val", data_dir=tmp_path)


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_CIFAR_SUBSET.is_file(), reason="shared CIFAR-10 subset not present")
def test_shared_cifar10_subset_loads_as_cifar10():
    test = load_dataset(SHARED_CIFAR_SUBSET)
    assert test.name == "cifar10" and test.classes == CIFAR10_CLASSES
    assert tuple(test.x.shape) == (1017, 3, 32, 32) and test.x.dtype == torch.float32
    counts = np.bincount(test.y.numpy(), minlength=10)
    assert counts.sum() == 1017 and counts.min() >= 87 and counts.max() <= 114
    train = load_dataset(SHARED_CIFAR_SUBSET, split="train", limit=20)
    assert train.subset["total_in_split"] == 5085 and train.index.tolist() == list(range(20))
    via_name = load_dataset("cifar10", data_dir=SHARED_CIFAR_SUBSET, n_per_class=2)
    assert torch.equal(via_name.x, test.x[via_name.index])
