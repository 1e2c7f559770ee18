"""The property at the command line (issue 27): `robaudit scan` on fuzzed data and options
exits 0 with valid outputs, or exits 2 with one line and nothing written.

The model is a 2-class smallcnn state_dict for 32x32 images; the data is an .npz file built
from a valid one and then spoiled one way (dtype, NaN, layout, labels, class names), with
fuzzed --class-names, --attack-opt and --eps next to it. Runs in-process (fuzz_support.run_cli).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from fuzz_support import assert_one_line_refusal, budget, run_cli


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from robaudit.audit.models.architectures import create_architecture

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small2.pt"
    torch.save(create_architecture("smallcnn", num_classes=2).state_dict(), path)
    return path


@st.composite
def spoiled_npz(draw):
    rng = np.random.default_rng(draw(st.integers(0, 9)))
    x = rng.random((4, 32, 32, 3), dtype=np.float32)
    y = np.array([0, 1, 0, 1])
    spoil = draw(st.sampled_from(["none", "uint8", "nan", "nchw", "range", "labels", "names", "big_label",
                                  "bool", "few_labels"]))
    contents = {}
    if spoil == "uint8":
        x = (x * 255).astype(np.uint8)
    elif spoil == "nan":
        x[0, 0, 0, 0] = np.nan
    elif spoil == "nchw":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif spoil == "range":
        x = x * 255
    elif spoil == "labels":
        y = y.astype(np.float32)
    elif spoil == "big_label":
        y = np.array([0, 1, 0, 5])
    elif spoil == "bool":
        x = x > 0.5
    elif spoil == "few_labels":
        y = y[:3]
    if spoil == "names" or draw(st.booleans()):
        contents["class_names"] = np.array(draw(st.lists(st.text(max_size=4), min_size=1, max_size=3)), dtype=str)
    return {"x_test": x, "y_test": y, **contents}


@budget(15)
@given(contents=spoiled_npz(),
       class_names=st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=3).map("\n".join)),
       attack_opt=st.one_of(st.none(), st.sampled_from(["pgd.steps=1", "pgd.steps=x", "pgd.step_size=-1",
                                                        "pgd.random_start=none", "fgsm.steps=2"])),
       eps=st.sampled_from(["8/255", "0", "2", "junk", "1/0"]), report=st.booleans())
def test_scan_exits_0_with_outputs_or_2_with_one_line_and_nothing_written(tmp_path_factory, model_file, contents,
                                                                       class_names, attack_opt, eps, report):
    root = tmp_path_factory.mktemp("scan")
    np.savez(root / "data.npz", **contents)
    out = root / "out"
    argv = ["scan", model_file, "--arch", "smallcnn", "--dataset", root / "data.npz", "--attacks", "clean,pgd",
            "--eps", eps, "--out", out, "--device", "cpu", "--attack-opt", attack_opt or "pgd.steps=1"]
    if class_names is not None:
        (root / "names.txt").write_text(class_names, encoding="utf-8", errors="surrogatepass")
        argv += ["--class-names", root / "names.txt"]
    if not report:
        argv.append("--no-report")
    code, stdout, err = run_cli(argv)
    event(f"exit {code}")
    if code == 0:
        results = json.loads((out / "results.json").read_text())
        assert set(results["attacks"]) == {"clean", "pgd"} and results["dataset"]["n"] == 4
        if report:
            assert (out / "report.html").read_text().rstrip().endswith("</html>")
        return
    assert_one_line_refusal(code, err)
    leftovers = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert leftovers == [], leftovers
