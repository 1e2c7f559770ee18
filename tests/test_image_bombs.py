"""Images that cannot be decoded safely (issue 27): pixel bombs, truncated, unknown, empty, zero-sized.

Every kind gets the same treatment: one line naming the file and exit 2 (nothing written), or
with --skip-bad-images the file is left out and counted. The bombs are PNGs written by hand: a
1-bit greyscale image whose IDAT really holds all its rows (zeros compress ~1000:1), so a
20000x20000 image is a ~50 kB file that would decode to 1.2 GB of RGB.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from robaudit.audit.data.datasets import load_dataset
from robaudit.errors import UserError
from test_cli import run_cli


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit greyscale PNG of width x height; `rows` < height leaves the pixel data truncated."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)        # filter byte + packed bits
    packer = zlib.compressobj(9)
    block = row * 1000                             # compressed in blocks: never 50 MB in memory
    rows = height if rows is None else rows
    parts = [packer.compress(block) for _ in range(rows // 1000)]
    parts += [packer.compress(row * (rows % 1000)), packer.flush()]
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def good_png(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    """Two classes, two good 32x32 images each."""
    root = tmp_path / "images"
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            good_png(root / name / f"{name}_{i}.png", 10 * k + i)
    return root


def _bad_files():
    """name -> bytes of each kind of bad image (all claim to be PNGs)."""
    import io

    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise, "PNG")
    truncated = noise.getvalue()                       # ~3 kB of incompressible pixel data
    return {
        "bomb": bilevel_png(20000, 20000),                 # 400 Mpx: PIL raises DecompressionBombError
        "warning_band": bilevel_png(10000, 10000),         # 100 Mpx: PIL only warns (1x..2x its limit)
        "zero_width": bilevel_png(0, 32),
        "empty": b"",
        "unknown_format": b"GIF00 this is no image format PIL knows" * 10,
        "truncated": truncated[: len(truncated) // 2],
    }


BAD = _bad_files()




def test_the_bomb_files_are_what_they_claim():
    assert len(BAD["bomb"]) < 1_000_000          # "a 1 MB file" of the issue, or less
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS   # look at the header unguarded
    try:
        import io

        with Image.open(io.BytesIO(BAD["bomb"])) as image:
            assert image.size == (20000, 20000) and image.mode == "1"
        with Image.open(io.BytesIO(bilevel_png(2000, 3))) as image:   # the same writer decodes fully
            image.load()
            assert image.size == (2000, 3)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@pytest.mark.parametrize("kind", sorted(BAD))
def test_every_bad_kind_is_one_line_naming_the_file_or_skipped(folder, kind):
    bad = folder / "cat" / f"zz_{kind}.png"
    bad.write_bytes(BAD[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # PIL's DecompressionBombWarning must not escape
        if kind == "truncated":                      # header fine: found when its pixels are decoded
            data = load_dataset(folder)
            with pytest.raises(UserError, match=r"cannot decode image .*zz_truncated\.png") as err:
                data.x[:]
        else:
            with pytest.raises(UserError, match=rf"cannot read image .*zz_{kind}\.png .*--skip-bad-images") as err:
                load_dataset(folder)
        assert "\n" not in str(err.value)
        data = load_dataset(folder, skip_bad_images=True, workers=1)
    assert data.subset["skipped_bad_images"] == 1 and data.subset["skipped_files"] == [str(bad.resolve())]
    assert data.y.tolist() == [0, 0, 1, 1] and data.x[:].shape == (4, 3, 32, 32)


def test_pixel_limit_is_pils_value_read_at_open_and_inclusive(folder, monkeypatch):
    from robaudit.audit.data import image_folders

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)    # every good image is exactly at it
    assert load_dataset(folder).x[:].shape == (4, 3, 32, 32)
    Image.fromarray(np.zeros((32, 33, 3), np.uint8)).save(folder / "dog" / "wide.png")   # one pixel column more
    with pytest.raises(UserError, match=r"wide\.png \(over the 1,024-pixel limit: Image size \(1056 pixels\)"):
        load_dataset(folder)
    # PIL's warning silenced (an embedding program's filters): the header check still refuses it
    monkeypatch.setattr(image_folders.warnings, "filterwarnings", lambda *args, **kwargs: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match=r"wide\.png \(33x32 = 1,056 pixels, over the 1,024-pixel limit\)"):
            load_dataset(folder)


def test_cli_bomb_exit_2_one_line_nothing_written_then_skipped(folder, tmp_path, capsys):
    from robaudit.audit.models.architectures import create_architecture

    (folder / "cat" / "zz_bomb.png").write_bytes(BAD["bomb"])
    torch.manual_seed(0)
    model = tmp_path / "small.pt"
    torch.save(create_architecture("smallcnn", num_classes=2).state_dict(), model)
    out = tmp_path / "out"
    args = ["scan", model, "--arch", "smallcnn", "--dataset", folder, "--attacks", "clean", "--out", out,
            "--device", "cpu", "--no-report", "--workers", "0"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("robaudit: error: cannot read image ")
    assert "zz_bomb.png" in err and "pixel limit" in err and "internal error" not in err
    assert not out.exists() or not any(out.iterdir())

    code, stdout, err = run_cli(capsys, *args, "--skip-bad-images")
    assert code == 0, err
    subset = json.loads((out / "results.json").read_text())["dataset"]["subset"]
    assert subset["skipped_bad_images"] == 1 and subset["skipped_files"][0].endswith("zz_bomb.png")


def test_class_count_refuses_the_folder_before_any_image_is_opened(folder, tmp_path, capsys, monkeypatch):
    from robaudit.audit.data import image_folders

    (folder / "cat" / "zz_bomb.png").write_bytes(BAD["bomb"])

    def no_opening(path):
        raise AssertionError(f"{path} was opened before the class count was checked")

    monkeypatch.setattr(image_folders, "_open_checked", no_opening)
    code, _, err = run_cli(capsys, *["scan", tmp_path / "missing.pt", "--num-classes", "10", "--dataset", folder,
                                     "--out", tmp_path / "out", "--device", "cpu", "--skip-bad-images"])
    assert code == 2 and err.count("\n") == 1
    assert "--num-classes 10 does not match the dataset's 2 classes" in err
