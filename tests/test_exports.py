"""`robaudit export`: model-index (Hub model card metadata), CycloneDX ML-BOM, JUnit gates.

Each export is read back by a tested reader: huggingface_hub's model-index parser (the
Hub's own), cyclonedx-python-lib's strict JSON-schema validator, junitparser.
"""

from __future__ import annotations

import json

import pytest

from robaudit.audit.engine import ScanConfig, check_gates
from robaudit.audit.gates import gate_outcomes
from robaudit.cli import main
from robaudit.errors import GateFailed
from robaudit.exports import cyclonedx_json, junit_xml, model_index, model_index_yaml

from report_fixtures import make_results

CLASSES = ("airplane", "automobile", "bird")


@pytest.fixture
def results():
    return make_results(classes=CLASSES, attacks=("fgsm", "pgd"))


def test_model_index_reads_back_with_the_hubs_parser(results):
    yaml = pytest.importorskip("yaml")
    repocard_data = pytest.importorskip("huggingface_hub.repocard_data")
    document = yaml.safe_load(model_index_yaml(results))
    name, evals = repocard_data.model_index_to_eval_results(document["model-index"])
    assert name == "resnet18"
    # Fields the Hub documents as required: task.type, dataset.type/name, metric type/value.
    for e in evals:
        assert e.task_type == "image-classification" and e.dataset_type == "cifar10" and e.dataset_name
        assert e.metric_type in ("accuracy", "nsd") and isinstance(e.metric_value, float)
        assert e.dataset_split == "test" and not e.verified
    by_name = {e.metric_name: e.metric_value for e in evals}
    for k, cls in enumerate(CLASSES):   # per class, headline (ensemble) and clean, attack and eps in the name
        assert by_name[f"robust accuracy (ensemble of fgsm, pgd; linf eps=8/255): class {cls}"] == \
            results["ensemble"]["per_class"][k]["accuracy"]
        assert by_name[f"clean accuracy: class {cls}"] == results["attacks"]["clean"]["per_class"][k]["accuracy"]
    worst = results["ensemble"]["worst_class"]
    assert by_name[f"robust accuracy (ensemble of fgsm, pgd; linf eps=8/255): worst class ({worst})"] == \
        results["ensemble"]["worst"]
    assert by_name["NSD of the class robust accuracy (ensemble of fgsm, pgd; linf eps=8/255) (population SD / mean)"] \
        == results["ensemble"]["nsd"]


def test_model_index_yaml_escapes_odd_class_names(results):
    yaml = pytest.importorskip("yaml")
    odd = ['a: "b"', "- c\n#d", "é"]
    results = make_results(classes=odd, attacks=("pgd",))
    parsed = yaml.safe_load(model_index_yaml(results))["model-index"]
    assert parsed == model_index(results)


def test_cyclonedx_bom_validates_and_holds_the_wilson_intervals(results):
    validation = pytest.importorskip("cyclonedx.validation.json")
    from cyclonedx.schema import SchemaVersion

    text = cyclonedx_json(results)
    validator = validation.JsonStrictValidator(SchemaVersion.V1_6)
    assert validator.validate_str(text) is None
    bom = json.loads(text)
    (model,) = [c for c in bom["components"] if c["type"] == "machine-learning-model"]
    assert model["hashes"][0]["content"] == results["model"]["sha256"]
    metrics = model["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]
    per_class = {m["slice"]: m for m in metrics if "slice" in m}
    assert len(per_class) == len(CLASSES)
    for entry in results["ensemble"]["per_class"]:
        metric = per_class[f"class={entry['class']}"]
        low, high = (float(metric["confidenceInterval"][b]) for b in ("lowerBound", "upperBound"))
        assert [low, high] == entry["ci95"] and low <= float(metric["value"]) <= high
    # The validator bites: a number where the schema wants a string is refused.
    metrics[0]["value"] = 0.5
    assert validator.validate_str(json.dumps(bom)) is not None


def test_junit_has_one_testcase_per_policy_and_agrees_with_the_gates(results, tmp_path):
    junitparser = pytest.importorskip("junitparser")
    worst, nsd = results["ensemble"]["worst"], results["ensemble"]["nsd"]
    for under, over in ((worst, nsd), (worst + 1e-6, nsd), (worst, nsd - 1e-6), (None, nsd - 1e-6)):
        path = tmp_path / "gates.xml"
        path.write_text(junit_xml(results, fail_under_worst=under, fail_over_nsd=over))
        cases = [case for suite in junitparser.JUnitXml.fromfile(str(path)) for case in suite]
        policies = [p for p, v in (("fail_under_worst", under), ("fail_over_nsd", over)) if v is not None]
        assert [c.name.split()[0] for c in cases] == policies
        failed = [c.name.split()[0] for c in cases if not c.is_passed]
        expected = [o.policy for o in gate_outcomes(results, fail_under_worst=under, fail_over_nsd=over)
                    if not o.passed]
        assert failed == expected
        cfg = ScanConfig(out_dir=None, fail_under_worst=under, fail_over_nsd=over)
        if failed:
            with pytest.raises(GateFailed):
                check_gates(results, cfg)
        else:
            check_gates(results, cfg)
    assert failed == ["fail_over_nsd"]


def test_export_command_writes_or_prints_and_refuses_bad_input(results, tmp_path, capsys):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    main(["export", str(src), "--format", "model-index"])
    assert capsys.readouterr().out.startswith("model-index:")
    main(["export", str(src), "--format", "cyclonedx", "--out", str(tmp_path / "bom.json")])
    assert json.loads((tmp_path / "bom.json").read_text())["bomFormat"] == "CycloneDX"
    for args, message in ((["--format", "junit"], "--fail-under-worst"),
                          (["--format", "model-index", "--fail-over-nsd", "0.1"], "junit only"),
                          (["--format", "junit", "--fail-under-worst", "30"], "fraction")):
        with pytest.raises(SystemExit) as exit_:
            main(["export", str(src), *args, "--out", str(tmp_path / "never.txt")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "never.txt").exists()
