"""Image folders: ImageNet layouts, preprocessing, lazy loading, bad images (generated data only)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from robaudit.audit.data.datasets import load_dataset
from robaudit.audit.data.image_folders import LazyImages, stream_batches
from robaudit.audit.data.preprocessing import resolve_preprocessing
from robaudit.errors import UserError

# (synset, [(height, width), ...]): variable sizes and aspect ratios, both orientations
FOLDER = {"n01443537": [(40, 52), (36, 36)],
          "n01440764": [(44, 30), (50, 60), (33, 47)]}
MAPPING = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus",
           "n01484850 great white shark, white shark", "n02012849 crane",
           "n03126707 crane"]


def noise_image(height, width, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pattern = np.stack([xx * 5, yy * 7, (xx + yy) * 3], -1) % 256   # structure, so resizing matters
    return (0.6 * pattern + rng.integers(0, 100, (height, width, 3))).astype(np.uint8)


def write_jpeg(path, height, width, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise_image(height, width, seed)).save(path, quality=90)


@pytest.fixture
def synsets(tmp_path):
    root = tmp_path / "imagenet"
    seed = 0
    for synset, sizes in FOLDER.items():
        for k, (h, w) in enumerate(sizes):
            write_jpeg(root / synset / f"{synset}_{k}.JPEG", h, w, seed)
            seed += 1
    return root


def decoded(path):
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def test_resize_and_crop_match_torchvision_and_pil(synsets):
    data = load_dataset(synsets, resize=24, center_crop=20)
    assert isinstance(data.x, LazyImages)
    assert tuple(data.x.shape) == (5, 3, 20, 20) and data.x.dtype == torch.float32
    assert data.preprocessing == {"resize": 24, "center_crop": 20, "interpolation": "bilinear",
                                  "antialias": True, "resized_as": "uint8", "preset": None}
    x = data.x[:]
    assert x.min() >= 0 and x.max() <= 1
    for k, path in enumerate(data.x.files):
        image = decoded(path)
        # the same decoded uint8 image through the same torchvision calls: exactly equal
        reference = F.center_crop(F.resize(image, [24], antialias=True), [20]).float() / 255
        assert torch.equal(x[k], reference)
        # RobustBench's path is PIL's resize: torch's uint8 antialiased kernel is PIL's integer
        # one, so they differ by at most one grey level (rounding), never more
        h, w = image.shape[1:]
        size = (24, int(24 * w / h)) if h <= w else (int(24 * h / w), 24)
        pil = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        pil = F.center_crop(torch.from_numpy(np.array(pil)).permute(2, 0, 1), [20]).float() / 255
        assert (x[k] - pil).abs().max() <= 1 / 255 + 1e-6


def test_preset_and_refusals(synsets):
    assert resolve_preprocessing(preset="robustbench-imagenet").record()["resize"] == 256
    assert load_dataset(synsets, preprocess="robustbench-imagenet").x.shape[1:] == (3, 224, 224)
    assert load_dataset(synsets, center_crop=30).preprocessing["resize"] is None
    for kwargs, message in (({"resize": 20, "center_crop": 24}, "larger than the resized"),
                            ({"resize": 0}, "positive"), ({"center_crop": -3}, "positive"),
                            ({"preprocess": "robustbench-imagenet", "resize": 8}, "already sets"),
                            ({"preprocess": "nope"}, "unknown --preprocess"),
                            ({"center_crop": 34}, r"is 30x44, smaller than --center-crop 34"),
                            ({"resize": 24}, "pass --center-crop"),
                            ({}, "pass --center-crop")):
        with pytest.raises(UserError, match=message):
            load_dataset(synsets, **kwargs)


def test_resize_alone_when_all_images_share_an_aspect(tmp_path):
    for k, (h, w) in enumerate([(30, 40), (60, 80), (45, 60)]):
        write_jpeg(tmp_path / "d" / "a" / f"{k}.jpg", h, w, k)
    data = load_dataset(tmp_path / "d", resize=15)
    assert tuple(data.x.shape) == (3, 3, 15, 20) and tuple(data.x[:].shape) == (3, 3, 15, 20)


def test_in_memory_datasets_are_preprocessed_as_floats(tmp_path):
    x = np.random.default_rng(0).random((4, 3, 10, 14)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_test=x, y_test=np.arange(4) % 2)
    data = load_dataset(tmp_path / "d.npz", resize=7, center_crop=6)
    assert isinstance(data.x, torch.Tensor) and tuple(data.x.shape) == (4, 3, 6, 6)
    expected = F.center_crop(F.resize(torch.from_numpy(x), [7], antialias=True), [6]).clamp(0, 1)
    assert torch.allclose(data.x, expected, atol=0)
    assert data.preprocessing["resized_as"] == "float32"
    assert load_dataset(tmp_path / "d.npz").preprocessing is None   # nothing applied
    with pytest.raises(UserError, match="--labels applies to image folders only"):
        load_dataset(tmp_path / "d.npz", labels=tmp_path / "l.txt")


def test_class_order_and_synset_mapping(synsets, tmp_path):
    data = load_dataset(synsets, center_crop=30)
    assert data.classes == ["n01440764", "n01443537"] and data.y.tolist() == [0, 0, 0, 1, 1]
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("\n".join(MAPPING) + "\n")
    named = load_dataset(synsets, center_crop=30, class_names=mapping)
    # the mapping's order is the class order (a subset folder keeps ImageNet's indices);
    # first comma-separated name; the repeated 'crane' is told apart by its synset
    assert named.classes == ["tench", "goldfish", "great white shark", "crane (n02012849)", "crane (n03126707)"]
    assert named.y.tolist() == [0, 0, 0, 1, 1]
    assert named.subset["class_names_file"] == str(mapping.resolve())
    per_line = tmp_path / "names.txt"
    per_line.write_text("tench\ngoldfish\n")
    assert load_dataset(synsets, center_crop=30, class_names=per_line).classes == ["tench", "goldfish"]
    per_line.write_text("tench\ngoldfish\nshark\n")
    with pytest.raises(UserError, match="lists 3 names but the dataset has 2"):
        load_dataset(synsets, center_crop=30, class_names=per_line)
    mapping.write_text(MAPPING[0] + "\n" + MAPPING[2] + "\n")
    with pytest.raises(UserError, match="class 'n01443537' is not in --class-names"):
        load_dataset(synsets, center_crop=30, class_names=mapping)


def write_val_folder(root):
    files = {"ILSVRC2012_val_00000003": ("n01443537", 40, 52), "ILSVRC2012_val_00000001": ("n01440764", 36, 48),
             "ILSVRC2012_val_00000002": ("n01440764", 50, 50)}
    for k, (stem, (_, h, w)) in enumerate(sorted(files.items())):
        write_jpeg(root / f"{stem}.JPEG", h, w, k)
    write_jpeg(root / "unlabelled.JPEG", 30, 30, 9)
    return files


def test_val_layout_with_loc_val_solution_csv(tmp_path):
    root = tmp_path / "val"
    files = write_val_folder(root)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"{stem},{synset} 10 20 30 40" for stem, (synset, _, _) in files.items()]
    rows.append("ILSVRC2012_val_00000099,n01484850 1 2 3 4")   # labelled, but not in this folder
    csv.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    data = load_dataset(root, labels=csv, center_crop=30)
    # classes: every synset of the file, sorted (ImageNet's order), present or not
    assert data.classes == ["n01440764", "n01443537", "n01484850"]
    assert [os.path.basename(f) for f in data.x.files] == [f"ILSVRC2012_val_0000000{k}.JPEG" for k in (1, 2, 3)]
    assert data.y.tolist() == [0, 0, 1]
    assert data.subset["labels_without_image"] == 1 and data.subset["images_without_label"] == 1


def test_val_layout_with_tab_separated_list(tmp_path):
    root = tmp_path / "val"
    files = write_val_folder(root)
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{4 if s == 'n01443537' else 1}\t{stem}.JPEG\n" for stem, (s, _, _) in files.items()))
    data = load_dataset(root, labels=listing, center_crop=30)
    assert data.y.tolist() == [1, 1, 4] and data.classes == ["0", "1", "2", "3", "4"]
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\ne\nf\n")
    assert load_dataset(root, labels=listing, center_crop=30, class_names=names).classes == list("abcdef")
    listing.write_text("".join(f"{s}\t{stem}.JPEG\n" for stem, (s, _, _) in files.items()))
    assert load_dataset(root, labels=listing, center_crop=30).classes == ["n01440764", "n01443537"]
    listing.write_text("ILSVRC2012_val_00000001.JPEG n01440764\n")
    with pytest.raises(UserError, match=r"line 1: expected label<TAB>file"):
        load_dataset(root, labels=listing)


def test_unreadable_and_corrupt_images_are_named(synsets):
    (synsets / "n01440764" / "zz_not_an_image.jpg").write_bytes(os.urandom(300))
    with pytest.raises(UserError, match=r"cannot read image .*zz_not_an_image\.jpg .*--skip-bad-images"):
        load_dataset(synsets, center_crop=30)
    (synsets / "n01440764" / "zz_not_an_image.jpg").unlink()
    good = synsets / "n01443537" / "n01443537_0.JPEG"
    payload = good.read_bytes()
    (synsets / "n01443537" / "n01443537_1.JPEG").write_bytes(payload[: len(payload) // 2])   # truncated
    data = load_dataset(synsets, center_crop=30)   # headers are fine: found when decoding
    assert data.x[:4].shape == (4, 3, 30, 30)
    with pytest.raises(UserError, match=r"cannot decode image .*n01443537_1\.JPEG") as err:
        data.x[torch.tensor([4])]
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"n01443537_1\.JPEG"):
        list(stream_batches(data.x, [[0, 1], [2, 3], [4]], num_workers=2))


def test_skip_bad_images_counts_and_refills_the_subset(synsets):
    (synsets / "n01440764" / "n01440764_0.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = synsets / "n01443537" / "n01443537_0.JPEG"
    (synsets / "n01443537" / "n01443537_1.JPEG").write_bytes(good.read_bytes()[:300])
    data = load_dataset(synsets, center_crop=30, n_per_class=2, skip_bad_images=True, workers=2)
    # class 0 loses its first image and takes the next two; class 1 keeps its one good image
    assert data.index.tolist() == [1, 2, 3] and data.y.tolist() == [0, 0, 1]
    assert data.subset["skipped_bad_images"] == 2
    assert sorted(os.path.basename(f) for f in data.subset["skipped_files"]) == ["n01440764_0.JPEG",
                                                                                 "n01443537_1.JPEG"]
    assert data.x[:].shape == (3, 3, 30, 30)   # everything left decodes
    json.dumps(data.subset)


def test_lazy_indexing_equals_eager_and_streams_in_order(synsets):
    data = load_dataset(synsets, resize=24, center_crop=20)
    eager = data.x[:]
    assert len(data.x) == 5 and data.x.shape[1:] == (3, 20, 20)
    assert torch.equal(data.x[torch.tensor([4, 0, 2])], eager[[4, 0, 2]])
    assert torch.equal(data.x[np.array([3, 1])], eager[[3, 1]])
    assert torch.equal(data.x[1:4], eager[1:4]) and torch.equal(data.x[-1], eager[4])
    assert torch.equal(data.x[np.array([True, False, True, False, False])], eager[[0, 2]])
    batches = [np.array([3, 4]), np.array([0]), np.array([2, 1])]
    for workers in (0, 2):
        streamed = list(stream_batches(data.x, batches, num_workers=workers))
        assert len(streamed) == 3
        for positions, batch in zip(batches, streamed):
            assert batch.dtype == torch.float32 and torch.equal(batch, eager[positions])
    in_memory = torch.rand(6, 3, 2, 2)
    assert torch.equal(torch.cat(list(stream_batches(in_memory, [[5, 1], [0]], num_workers=2))),
                       in_memory[[5, 1, 0]])


def test_fingerprint_follows_files_and_preprocessing(synsets):
    data = load_dataset(synsets, center_crop=30)
    first = data.x.fingerprint()
    assert first == load_dataset(synsets, center_crop=30).x.fingerprint()
    assert first != load_dataset(synsets, center_crop=28).x.fingerprint()
    target = data.x.files[2]
    write_jpeg(type(synsets)(target), 50, 60, 123)           # same name, new content
    stat = os.stat(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data.x.fingerprint() != first


def run_main(main, capsys, args):
    """(exit code, stderr) of an in-process `robaudit ARGS`."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def test_cli_scan_of_a_variable_size_jpeg_folder(synsets, tmp_path, capsys):
    from robaudit.audit.models.architectures import create_architecture
    from robaudit.cli import main

    torch.manual_seed(0)
    model = tmp_path / "small.pt"
    torch.save(create_architecture("smallcnn", num_classes=5).state_dict(), model)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("\n".join(MAPPING) + "\n")
    out = tmp_path / "out"
    args = ["scan", model, "--arch", "smallcnn", "--dataset", synsets, "--class-names", mapping,
            "--resize", "40", "--center-crop", "32", "--workers", "2", "--attacks", "clean,pgd",
            "--attack-opt", "pgd.steps=2", "--out", out, "--device", "cpu", "--batch-size", "2", "--no-report"]
    code, err = run_main(main, capsys, args)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["classes"][:2] == ["tench", "goldfish"] and results["dataset"]["n"] == 5
    assert results["dataset"]["num_classes"] == 5
    assert results["attacks"]["clean"]["per_class"][0]["n"] == 3
    assert results["dataset"]["subset"]["class_names_file"] == str(mapping.resolve())

    # a corrupt image: one line naming it, exit 2, no results.json in a fresh --out
    payload = (synsets / "n01443537" / "n01443537_0.JPEG").read_bytes()
    (synsets / "n01443537" / "n01443537_1.JPEG").write_bytes(payload[: len(payload) // 2])
    bad_out = tmp_path / "bad"
    code, err = run_main(main, capsys, args[:-7] + ["--out", bad_out, "--device", "cpu", "--batch-size", "2",
                                                     "--no-report"])
    assert code == 2
    assert err.count("\n") == 1 and "robaudit: error: cannot decode image" in err and "n01443537_1.JPEG" in err
    assert not (bad_out / "results.json").exists()


def test_lazy_folder_scan_equals_the_in_memory_scan_resumes_and_streams(synsets, tmp_path, monkeypatch):
    """The engine on a lazy folder: per-sample results equal those on the same images held
    in memory (same batches, so bit for bit), decode workers change nothing, and a rerun
    reuses every attack chunk (the resume key is the folder's fingerprint, not its pixels)."""
    import dataclasses

    from robaudit.audit.attacks import PGD
    from robaudit.audit.engine import ScanConfig, run_scan
    from test_engine import CallCounter, Centroid, load_samples, make_model

    lazy = load_dataset(synsets, resize=24, center_crop=20)
    eager = dataclasses.replace(lazy, x=lazy.x[:])
    classes = ["c0", "c1", "c2", "c3", "c4"]   # Centroid has 5 classes; the folder's labels are 0/1
    lazy, eager = (dataclasses.replace(d, classes=classes) for d in (lazy, eager))

    def scan(out, data, workers=0):
        data.x.workers = workers if isinstance(data.x, LazyImages) else None
        cfg = ScanConfig(out_dir=out, attacks=["clean", "pgd"], attack_overrides={"pgd": {"steps": 3}},
                         batch_size=2, device="cpu", write_report=False)
        return run_scan(cfg, model=make_model(Centroid()), data=data)

    scan(tmp_path / "eager", eager)
    scan(tmp_path / "lazy", lazy, workers=2)
    reference, streamed = load_samples(tmp_path / "eager"), load_samples(tmp_path / "lazy")
    assert set(reference) == set(streamed)
    for key in reference:
        np.testing.assert_array_equal(streamed[key], reference[key], err_msg=key)

    with monkeypatch.context() as m:
        pgd_calls = CallCounter(m, PGD)
        again = scan(tmp_path / "lazy", lazy, workers=0)
    assert pgd_calls.calls == 0                       # every PGD chunk came from the resume state
    assert again["dataset"]["preprocessing"]["center_crop"] == 20
    for key in reference:
        np.testing.assert_array_equal(load_samples(tmp_path / "lazy")[key], reference[key], err_msg=key)


def test_torchvision_imagenet_model_audits_a_jpeg_folder_with_the_robustbench_preset(synsets, tmp_path, capsys):
    """Issue 17's end to end: a torchvision ImageNet architecture (random weights; the
    smallest one, so the test stays fast) on variable-size JPEGs at 224 px."""
    import torchvision

    from robaudit.cli import main

    torch.manual_seed(0)
    weights = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None, num_classes=2).state_dict(), weights)
    out = tmp_path / "out"
    code, err = run_main(main, capsys, [
        "scan", weights, "--arch", "mobilenet_v3_small", "--dataset", synsets,
        "--preprocess", "robustbench-imagenet", "--attacks", "clean,pgd", "--attack-opt", "pgd.steps=1",
        "--out", out, "--device", "cpu", "--batch-size", "4"])
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["preprocessing"]["resize"] == 256
    assert results["dataset"]["preprocessing"]["center_crop"] == 224
    assert results["model"]["arch"] == "torchvision:mobilenet_v3_small" and results["dataset"]["n"] == 5
    assert results["dataset"]["classes"] == sorted(FOLDER)             # synset order
    assert (out / "report.html").stat().st_size > 0
    assert "224" in (out / "report.html").read_text()
