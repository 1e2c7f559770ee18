"""Adding a remediation method is one file: a toy method (tests/toy_method.py) registered by
importing it appears in `robaudit list`, trains through `robaudit remediate`, and the
per-class state it declares reaches metrics.csv, results.json and the comparison report
with no edit anywhere in robaudit. Also: every registered trainer describes itself."""

from __future__ import annotations

import csv
import importlib
import json

import numpy as np
import pytest
import torch

from robaudit.audit.models.architectures import create_architecture
from robaudit.remediate import METHODS, Trainer

from test_cli import run_cli
from test_engine import CLASSES, make_arrays


@pytest.fixture
def toy_method():
    import toy_method as module

    if module.NAME not in METHODS:     # an earlier test unregistered it: register again
        module = importlib.reload(module)
    yield module
    METHODS.unregister(module.NAME)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_describes_itself_to_the_command(name):
    method = METHODS.get(name)
    assert issubclass(method, Trainer) and method.name == name
    assert method.default_epochs >= 1
    assert all(isinstance(option, str) for option in method.option_names())
    assert set(method.shortcut_options()) <= set(method.option_names())
    assert METHODS.describe()[name]   # a help line for `robaudit list`


def test_a_method_from_one_file_reaches_list_metrics_results_and_report(toy_method, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "list", "--options")
    assert code == 0
    line = next(row for row in stdout.splitlines() if row.split()[:1] == [toy_method.NAME])
    assert "needs training data" in line and "a teacher" not in line
    assert "base_weight" in stdout

    x_train, y_train = make_arrays(seed=1, per_class=12)
    x_test, y_test = make_arrays(seed=2, per_class=4)
    data = tmp_path / "toy.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=np.array(CLASSES))
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save(create_architecture("smallcnn", num_classes=len(CLASSES)).state_dict(), teacher)
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "remediate", "--method", toy_method.NAME, "--teacher", teacher,
                              "--arch", "smallcnn", "--dataset", data, "--student", "smallcnn", "--epochs", 2,
                              "--batch-size", 16, "--val-per-class", 0, "--audit-attacks", "clean,fgsm",
                              "--method-opt", "base_weight=2", "--device", "cpu", "--out", out)
    assert code == 0, stderr

    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    weights = [[float(row[f"toy_weight:{name}"]) for name in CLASSES] for row in rows]
    accuracy = [[float(row[f"train_acc_adv:{name}"]) for name in CLASSES] for row in rows]
    for w_row, a_row in zip(weights, accuracy):   # the method's own rule, read back from the file
        assert w_row == pytest.approx([2.0 - a for a in a_row], abs=1e-6)

    results = json.loads((out / "student" / "results.json").read_text())
    training = results["training"]
    assert training["method"] == toy_method.NAME and training["options"]["method"]["base_weight"] == 2.0
    assert training["options"]["schedule_preset"].startswith("shared:")          # no --schedule given
    assert training["options"]["val_per_class"] == 0 and training["options"]["val_per_class_rule"] == "given"
    [state] = training["class_state"]
    assert state["name"] == "toy_weight" and state["label"] == toy_method.TOY_WEIGHT.label
    np.testing.assert_allclose(state["per_epoch"], weights, rtol=0, atol=1e-6)   # csv rounds to 6 decimals

    html = (out / "report.html").read_text()
    assert "Before and after" in html   # the comparison report (teacher audited first)
    assert "Toy per-class weight (1.5 - training accuracy)" in html
    # The page opens with the paired verdict on the class that was worst before; recount it here.
    assert html.index('id="comparison"') < html.index('id="verdict"')
    before = json.loads((out / "teacher" / "results.json").read_text())
    worst = before["ensemble"]["worst_class"]
    k = CLASSES.index(worst)
    outcomes = []
    for side in ("teacher", "student"):
        with np.load(out / side / "samples.npz") as samples:
            ok = (samples["clean_pred"] == samples["y"]) & samples["robust_fgsm"]
            order = np.argsort(samples["index"])
            outcomes.append((ok[order], samples["y"][order]))
    (ok_b, y), (ok_a, _) = outcomes
    became_right = int(np.sum(ok_a[y == k] & ~ok_b[y == k]))
    became_wrong = int(np.sum(ok_b[y == k] & ~ok_a[y == k]))
    assert (f"The class that was worst before, {worst}," in html
            and f"{became_right} became correct and {became_wrong} became wrong" in html)
