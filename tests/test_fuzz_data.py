"""Property-based tests of the data readers (issue 27): .npz files, image folders, labels files
(LOC_val_solution.csv and the tab-separated list) with --class-names. Each load gives a valid
EvalData (float32 NCHW in [0, 1], labels inside the class list) or one UserError line; cases
hypothesis found are kept as @example.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from fuzz_support import budget, no_stray_warnings, outcome
from robaudit.errors import UserError

DTYPES = [np.uint8, np.int8, np.int16, np.int64, np.uint16, np.float16, np.float32, np.float64, np.bool_,
          np.complex64, np.dtype("U3"), np.dtype("S3"), np.dtype("datetime64[s]")]


def check_eval_data(data) -> None:
    """What every loaded data set must be, whatever file it came from."""
    x = data.x[:] if not isinstance(data.x, torch.Tensor) else data.x
    assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] in (1, 3), x.shape
    assert len(x) == len(data.y) == len(data.index) > 0
    assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert data.y.dtype == torch.int64
    assert int(data.y.min()) >= 0 and int(data.y.max()) < len(data.classes)
    assert all(isinstance(c, str) for c in data.classes)


def arrays_for(role: str):
    shapes = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4) if role == "x" \
        else hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6)
    return st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(dtype, shapes))


def valid_images():
    """Arrays the reader should accept (so the 'ok' branch is exercised often)."""
    layouts = st.sampled_from([(2, 3, 4, 4), (2, 4, 4, 3), (3, 5, 5), (2, 1, 3, 3), (2, 3, 3, 3)])
    return st.one_of(
        layouts.flatmap(lambda s: hnp.arrays(np.uint8, s)),
        layouts.flatmap(lambda s: hnp.arrays(np.float32, s, elements=st.floats(0, 1, width=32))),
        layouts.flatmap(lambda s: hnp.arrays(np.float64, s)),   # NaN, inf, out of range
    )


@st.composite
def npz_contents(draw):
    contents = {}
    x = draw(st.one_of(valid_images(), arrays_for("x")))
    n = x.shape[0] if x.ndim else 0
    y = draw(st.one_of(hnp.arrays(np.int64, (n,), elements=st.integers(-2, 12)),
                       hnp.arrays(np.int64, (n, 1), elements=st.integers(0, 3)), arrays_for("y")))
    x_key, y_key = draw(st.sampled_from([("x_test", "y_test"), ("x", "y"), ("x_train", "y_train"),
                                         ("x_test", "labels"), ("images", "y_test")]))
    contents[x_key], contents[y_key] = x, y
    if draw(st.booleans()):
        contents["class_names"] = draw(st.one_of(
            st.lists(st.text(max_size=4), max_size=14).map(lambda names: np.array(names, dtype=str)),
            hnp.arrays(np.int64, (3,)), hnp.arrays(np.dtype("S2"), (4,)),
            st.just(np.array([{"a": 1}, None], dtype=object))))
    if draw(st.booleans()):
        contents["y_train"] = draw(arrays_for("y"))
    return contents


@budget(120)
@given(contents=npz_contents(), split=st.sampled_from(["test", "train"]), as_cifar=st.booleans(),
       n_per_class=st.sampled_from([None, 1]))
@example(contents={"x_test": np.zeros((2, 3, 4, 4), np.uint8), "y_test": np.array([0, 1]),
                   "class_names": np.array([b"\xff\xfe", b"b"], dtype="S2")},
         split="test", as_cifar=False, n_per_class=None).via("class names that are not utf-8")
@example(contents={"x_test": np.zeros((2, 3, 4, 4), np.uint8), "y_test": np.array([0, 1]),
                   "class_names": np.array([["a", "b"]], dtype=str)},
         split="test", as_cifar=False, n_per_class=None).via("2-D class names")
def test_npz_files(tmp_path_factory, contents, split, as_cifar, n_per_class):
    from robaudit.audit.data.datasets import load_dataset

    path = tmp_path_factory.mktemp("npz") / ("cifar10_fuzz.npz" if as_cifar else "fuzz.npz")
    np.savez(path, **contents)    # object arrays are pickled by savez: the reader must refuse them
    with no_stray_warnings():
        kind, data = outcome(load_dataset, path, split=split, n_per_class=n_per_class)
        if kind == "ok":
            check_eval_data(data)


@budget(30)
@given(payload=st.one_of(st.binary(max_size=64), st.just(b"PK\x03\x04" + b"\x00" * 40)),
       single=st.booleans())
@example(payload=b"", single=False).via("an empty file: numpy raises EOFError")
def test_files_that_are_no_npz_archive(tmp_path_factory, payload, single):
    from robaudit.audit.data.datasets import load_dataset

    path = tmp_path_factory.mktemp("npz") / "data.npz"
    if single:
        np.save(path.with_suffix(".npy"), np.zeros((2, 3)))
        path.with_suffix(".npy").rename(path)          # one .npy array under an .npz name
    else:
        path.write_bytes(payload)
    kind, data = outcome(load_dataset, path)
    assert kind == "refused"


# ---------------------------------------------------------------------------------- image folders

MODES = ["RGB", "RGBA", "L", "LA", "1", "P", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"png": "PNG", "jpg": "JPEG", "bmp": "BMP", "tif": "TIFF", "webp": "WEBP", "ppm": "PPM"}


@st.composite
def image_bytes(draw):
    """(extension, bytes): a small image in some mode and format, or something that is not one."""
    ext = draw(st.sampled_from(sorted(FORMATS)))
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return ext, draw(st.binary(max_size=30))
    mode = draw(st.sampled_from(MODES))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    array = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode) if mode not in ("I;16", "I", "F") else \
        Image.fromarray(array[..., 0]).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, FORMATS[ext])
    except (OSError, ValueError, KeyError):   # that format cannot hold that mode: write PNG bytes instead
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, FORMATS[ext])
    payload = buffer.getvalue()
    if choice == 1:
        payload = payload[: max(1, len(payload) * 2 // 3)]   # truncated
    return ext, payload


def truncated_tiff() -> bytes:
    """A TIFF cut inside its tags: PIL warns "Truncated File Read" while reading the header."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(buffer, "TIFF")
    return buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]


FOLDER_NAME = st.one_of(st.sampled_from(["cat", "dog", "n01440764", "a b", "<script>", "é", "x\ny", ".hidden"]),
                        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                                min_size=1, max_size=6).filter(lambda s: s not in (".", "..")))


@budget(60)
@given(classes=st.dictionaries(FOLDER_NAME, st.lists(image_bytes(), max_size=3), min_size=0, max_size=3),
       crop=st.sampled_from([None, 1, 2, 4]), skip=st.booleans())
@example(classes={"cat": [("tif", truncated_tiff())], "dog": [("png", b"")]}, crop=None,
         skip=True).via("PIL's TIFF warnings printed a second line")
def test_image_folders(tmp_path_factory, classes, crop, skip):
    from robaudit.audit.data.datasets import load_dataset

    root = tmp_path_factory.mktemp("folder") / "images"
    root.mkdir()
    for name, files in classes.items():
        (root / name).mkdir(exist_ok=True)
        for k, (ext, payload) in enumerate(files):
            (root / name / f"{k}.{ext}").write_bytes(payload)
    with no_stray_warnings():
        kind, data = outcome(load_dataset, root, center_crop=crop, skip_bad_images=skip, workers=0)
        if kind == "ok":
            try:
                check_eval_data(data)
            except UserError as err:    # a truncated image found when decoding: one line, named
                assert not skip and "\n" not in str(err) and "cannot decode image" in str(err)


# ------------------------------------------------------------------------------------ labels files

LABEL = st.one_of(st.integers(-1, 4).map(str), st.sampled_from(["n01440764", "n01443537", "cat", "²", "--1", "",
                                                                "1.0", " 2", "n0144"]), st.text(max_size=4))
KEY = st.sampled_from(["a", "a.png", "b.png", "c", "sub/c.png", "missing.png", "", " a.png", "../a.png"])


@st.composite
def labels_text(draw):
    rows = draw(st.lists(st.tuples(KEY, LABEL), max_size=5))
    if draw(st.booleans()):
        lines = ["ImageId,PredictionString"] + [f"{key},{label} 1 2 3 4" for key, label in rows]
    else:
        lines = [f"{label}\t{key}" for key, label in rows]
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=10)))   # a stray line
    return "\n".join(lines)


CLASS_NAMES = st.one_of(st.none(), st.just("n01440764 tench, Tinca tinca\nn01443537 goldfish"),
                        st.just("n01440764 tench\nn01440764 tench again"), st.just("zero\none\ntwo\nthree\nfour"),
                        st.just('["zero", "one"]'), st.text(max_size=20))


@budget(120)
@given(text=labels_text(), names=CLASS_NAMES)
@example(text="²\ta.png", names=None).via("a superscript digit read as a class index")
@example(text="--1\ta.png", names=None).via("a double minus read as a class index")
def test_labels_files(tmp_path_factory, text, names):
    from robaudit.audit.data.datasets import load_dataset

    root = tmp_path_factory.mktemp("flat")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        Image.new("RGB", (4, 4), (10, 20, 30)).save(images / name)
    labels = root / "labels.txt"
    labels.write_text(text, encoding="utf-8", errors="surrogatepass")
    class_names = None
    if names is not None:
        class_names = root / "names.txt"
        class_names.write_text(names, encoding="utf-8", errors="surrogatepass")
    with no_stray_warnings():
        kind, data = outcome(load_dataset, images, labels=labels, class_names=class_names, workers=0)
        if kind == "ok":
            check_eval_data(data)
