"""results.json where users' tools read it: a Hugging Face model card's `model-index`,
a CycloneDX ML-BOM, JUnit XML for the gates (`robaudit export`).

- model-index (the Hub's model card metadata, huggingface/hub-docs modelcard.md): one
  result per audit (task image-classification; dataset type/name/split), metrics of type
  "accuracy" (and "nsd") whose `name` carries the attack, norm and eps, e.g.
  "robust accuracy (ensemble of fgsm, pgd; linf eps=8/255): class cat". YAML, to paste into a
  README's front matter.
- CycloneDX 1.6 ML-BOM: the model as a machine-learning-model component (its sha256), built
  with cyclonedx-python-lib; the library does not model `modelCard` yet (component.py: "TODO
  since CDX1.5"), so the `modelCard.quantitativeAnalysis.performanceMetrics` list is added to
  the serialised component and the whole BOM is checked with the library's strict JSON-schema
  validator before it is returned. One metric per class (slice "class=NAME") with its 95%
  Wilson interval as `confidenceInterval`, plus the headline's mean, worst class and NSD.
- JUnit: one <testcase> per gate policy (audit/gates.py), failed ones with a <failure>.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional

from robaudit.audit.gates import gate_outcomes
from robaudit.audit.headline import CLEAN_KEY, ENSEMBLE_KEY, headline_key, summary_block
from robaudit.errors import UserError

FORMATS = ("model-index", "cyclonedx", "junit")
TOOL = "robaudit"


def budget_text(results: dict) -> str:
    """'linf eps=8/255' (L-inf budgets as k/255, as the report reads them) or 'l2 eps=0.5'."""
    config = results["config"]
    norm = config.get("norm") or "linf"
    if norm == "linf" and config.get("eps_255") is not None:
        return f"linf eps={config['eps_255']:g}/255"
    return f"{norm} eps={config['eps']:g}"


def attack_text(results: dict, key: str) -> str:
    if key == ENSEMBLE_KEY:
        members = [m for m in (results.get(ENSEMBLE_KEY) or {}).get("attacks", []) if m != CLEAN_KEY]
        return f"ensemble of {', '.join(members)}" if members else "ensemble"
    return key


def _metric_label(results: dict, key: str) -> str:
    if key == CLEAN_KEY:
        return "clean accuracy"
    return f"robust accuracy ({attack_text(results, key)}; {budget_text(results)})"


def model_name(results: dict) -> str:
    path = str(results["model"].get("path") or "model")
    return Path(path).stem if not path.startswith("<") else path.strip("<>")


def _finite(value) -> Optional[float]:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


# ------------------------------------------------------------------------------------- model-index
def model_index(results: dict, *, name: Optional[str] = None) -> list:
    """The `model-index` list (plain data; `model_index_yaml` writes it)."""
    key = headline_key(results)
    metrics = []
    for block_key in dict.fromkeys([CLEAN_KEY, key]):
        block = summary_block(results, block_key)
        if block is None:
            continue
        label = _metric_label(results, block_key)
        if _finite(block.get("avg")) is not None:
            metrics.append({"type": "accuracy", "value": block["avg"], "name": f"{label}: mean over classes"})
        if _finite(block.get("worst")) is not None:
            metrics.append({"type": "accuracy", "value": block["worst"],
                            "name": f"{label}: worst class ({block['worst_class']})"})
        if block_key != CLEAN_KEY and _finite(block.get("nsd")) is not None:
            metrics.append({"type": "nsd", "value": block["nsd"],
                            "name": f"NSD of the class {label} (population SD / mean)"})
        for entry in block["per_class"]:
            if _finite(entry["accuracy"]) is not None:
                metrics.append({"type": "accuracy", "value": entry["accuracy"],
                                "name": f"{label}: class {entry['class']}"})
    dataset = results["dataset"]
    return [{"name": name or model_name(results), "results": [{
        "task": {"type": "image-classification", "name": "Class-wise adversarial robustness"},
        "dataset": {"type": str(dataset["name"]), "name": str(dataset["name"]), "split": str(dataset["split"])},
        "metrics": metrics,
        # no "source": the Hub requires its url with its name, and a local audit has none
    }]}]


def _yaml(value, indent: int = 0) -> List[str]:
    """Block YAML of dicts, lists, strings and numbers; strings as JSON strings (valid YAML)."""
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                lines.append(f"{pad}{k}:")
                lines.extend(_yaml(v, indent + 2))
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            inner = _yaml(item, indent + 2)
            lines.append(f"{pad}- {inner[0].lstrip()}")
            lines.extend(inner[1:])
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def _scalar(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return json.dumps(str(value), ensure_ascii=False)


def model_index_yaml(results: dict, *, name: Optional[str] = None) -> str:
    return "\n".join(_yaml({"model-index": model_index(results, name=name)})) + "\n"


# ------------------------------------------------------------------------------------- CycloneDX
def performance_metrics(results: dict) -> list:
    key = headline_key(results)
    block = summary_block(results, key)
    label = _metric_label(results, key)
    metrics = []
    for field, what in (("avg", "mean over classes"), ("worst", f"worst class ({block.get('worst_class')})"),
                        ("nsd", "NSD (population SD / mean of class accuracies)")):
        if _finite(block.get(field)) is not None:
            metrics.append({"type": f"{label}: {what}", "value": repr(float(block[field]))})
    for entry in block["per_class"]:
        if _finite(entry["accuracy"]) is None:
            continue
        low, high = entry["ci95"]
        metrics.append({"type": label, "value": repr(float(entry["accuracy"])), "slice": f"class={entry['class']}",
                        "confidenceInterval": {"lowerBound": repr(float(low)), "upperBound": repr(float(high))}})
    return metrics


def cyclonedx_json(results: dict) -> str:
    """A CycloneDX 1.6 ML-BOM (JSON), validated against the 1.6 schema before it is returned."""
    try:
        from cyclonedx.model import HashAlgorithm, HashType
        from cyclonedx.model.bom import Bom
        from cyclonedx.model.component import Component, ComponentType
        from cyclonedx.output.json import JsonV1Dot6
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError as err:
        raise UserError(f"the cyclonedx export needs cyclonedx-python-lib[json-validation] ({err.name} is "
                        "missing): pip install 'cyclonedx-python-lib[json-validation]'") from None

    model = results["model"]
    sha = model.get("sha256") or ""
    hashes = [HashType(alg=HashAlgorithm.SHA_256, content=sha)] if len(sha) == 64 else []
    component = Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=model_name(results),
                          bom_ref="model", hashes=hashes)
    tool = Component(type=ComponentType.APPLICATION, name=TOOL, version=str(results.get("tool", {}).get("version")))
    bom = Bom(components=[component])
    bom.metadata.tools.components.add(tool)
    document = json.loads(JsonV1Dot6(bom).output_as_string())
    for entry in document["components"]:
        if entry.get("bom-ref") == "model":
            entry["modelCard"] = {"quantitativeAnalysis": {"performanceMetrics": performance_metrics(results)}}
    text = json.dumps(document, indent=2, ensure_ascii=False)
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:   # our bug, not the user's: never hand out a BOM that does not validate
        raise RuntimeError(f"the CycloneDX BOM does not validate: {error}")
    return text + "\n"


# ------------------------------------------------------------------------------------- JUnit
def junit_xml(results: dict, *, fail_under_worst: Optional[float] = None, fail_over_nsd: Optional[float] = None,
              gate_attack: Optional[str] = None) -> str:
    """One testsuite "robaudit.gates", one testcase per given policy."""
    if fail_under_worst is None and fail_over_nsd is None:
        raise UserError("the junit export reports the gates: give --fail-under-worst and/or --fail-over-nsd")
    outcomes = gate_outcomes(results, fail_under_worst=fail_under_worst, fail_over_nsd=fail_over_nsd,
                             gate_attack=gate_attack)
    failures = sum(not o.passed for o in outcomes)
    suites = ET.Element("testsuites", tests=str(len(outcomes)), failures=str(failures), errors="0")
    suite = ET.SubElement(suites, "testsuite", name=f"{TOOL}.gates", tests=str(len(outcomes)),
                          failures=str(failures), errors="0", skipped="0",
                          timestamp=str(results.get("finished_at") or "")[:19])
    for outcome in outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"{TOOL}.gates.{model_name(results)}",
                             name=f"{outcome.policy} {outcome.threshold:g} ({outcome.block})", time="0")
        if outcome.passed:
            ET.SubElement(case, "system-out").text = outcome.message
        else:
            ET.SubElement(case, "failure", message=outcome.message, type="GateFailed").text = outcome.message
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def export_text(results: dict, fmt: str, **gates) -> str:
    if fmt == "model-index":
        return model_index_yaml(results)
    if fmt == "cyclonedx":
        return cyclonedx_json(results)
    if fmt == "junit":
        return junit_xml(results, **gates)
    raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def write_export(results_file, fmt: str, out_file=None, **gates) -> str:
    """Read and check RESULTS_FILE, build the export, then (out_file) write it atomically; return the text."""
    from robaudit.audit.engine import ScanConfig, check_gate_config
    from robaudit.audit.io import write_text_atomic
    from robaudit.audit.report.render import load_results

    results = load_results(results_file)
    if fmt != "junit" and any(v is not None for v in gates.values()):
        raise UserError("--fail-under-worst / --fail-over-nsd apply to --format junit only")
    if fmt == "junit":
        check_gate_config(ScanConfig(out_dir=None, **gates), list(results["attacks"]))
    text = export_text(results, fmt, **(gates if fmt == "junit" else {}))
    if out_file is not None:
        out = Path(out_file)
        if out.is_dir():
            raise UserError(f"--out {out} is a directory; pass a file name")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, text)
        except OSError as err:
            raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    return text
