"""Named configurations: one per paper-table row robaudit can run (`robaudit remediate --preset NAME`).

Each preset sets `robaudit remediate` options, every value with where it comes from: the
ABSLD paper (NeurIPS 2024; shared/papers/absld_neurips2024.txt: Sec. 5.1, App. A.3,
A.5, A.7, Tables 1-5), the authors' code (zhaoshiji123/ABSLD resnet18_absld_cifar10.py at
commit 99ed9cd, lines as cited), or a method's own schedule (each method's `paper_schedule`,
remediate/*.py, with its source). A flag given on the command line overrides the preset's
value; results.json training.options.preset records the preset, every value with its
source, and every override (`apply_preset`).

Paper numbers are the table rows (%, Avg / Worst / NSD; "Worst" is the worst class on
CIFAR-10 and the worst-10% classes on CIFAR-100 and Tiny-ImageNet, ABSLD Sec. 5.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from robaudit.errors import UserError

ABSLD_CODE = "zhaoshiji123/ABSLD resnet18_absld_cifar10.py (commit 99ed9cd)"
SEC51 = "ABSLD paper Sec. 5.1 (Training Setting)"
A3 = "ABSLD paper App. A.3"

# (value, source) of the ABSLD CIFAR setting, shared by its CIFAR presets.
ABSLD_CIFAR = {
    "method": ("absld", "ABSLD paper (the method of the row)"),
    "epochs": (300, f"{SEC51}; {ABSLD_CODE} line 20 `epochs = 300`"),
    "batch_size": (128, f"{SEC51}; {ABSLD_CODE} line 21 `batch_size = 128`"),
    "eps": ("8/255", f"{SEC51}; {ABSLD_CODE} line 22 `epsilon = 8/255.0`"),
    "lr": (0.1, f"{SEC51}; {ABSLD_CODE} line 54 `optim.SGD(..., lr=0.1, momentum=0.9, weight_decay=2e-4)`"),
    "momentum": (0.9, f"{SEC51}; {ABSLD_CODE} line 54"),
    "weight_decay": (2e-4, f"{SEC51}; {ABSLD_CODE} line 54"),
    "milestones": ("215,260,285", f"{SEC51}; {ABSLD_CODE} `if epoch in [215,260,285]` (end of the epoch loop)"),
    "steps": (10, f"{SEC51} (10-step PGD, step 2/255); {ABSLD_CODE} absld_inner_loss(..., perturb_steps=10)"),
    "beta": (0.1, f"{SEC51}; {ABSLD_CODE} line 69 `class_labels_temp_rate = 0.1`"),
    "tau_min": (0.5, f"{A3}; {ABSLD_CODE} line 72 `temp_min = 0.5`"),
    "tau_max": (5.0, f"{A3}; {ABSLD_CODE} line 71 `temp_max = 5`"),
    "no_augment": (False, f"{ABSLD_CODE} lines 25-26 RandomCrop(32, padding=4), RandomHorizontalFlip()"),
}
CIFAR10_TEACHER = ("wrn-34-10", "ABSLD paper Sec. 5.1 and App. A.7: WideResNet-34-10 trained by TRADES "
                                "(Table 7: clean 84.91, AA 53.08)")
CIFAR100_TEACHER = ("wrn-70-16", "ABSLD paper Sec. 5.1 and App. A.7: WideResNet-70-16 of ref. [9] "
                                 "(Table 7: clean 60.96, AA 30.03)")
TINY_TEACHER = ("preactresnet34", "ABSLD paper App. A.5/A.7: PreActResNet-34 trained by TRADES "
                                  "(Table 7: clean 52.76, AA 18.92)")


@dataclass(frozen=True)
class Preset:
    name: str
    row: str                                   # the paper table row it reproduces
    dataset: str                               # registered dataset name the row used
    values: Dict[str, Tuple[object, str]]      # remediate option -> (value, source)
    paper: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)  # attack -> (avg, worst, nsd)
    note: str = ""

    @property
    def source(self) -> str:
        return self.row


def _schedule(method: str, source_table: str) -> Dict[str, Tuple[object, str]]:
    """A baseline under its own schedule: its `paper_schedule` (remediate/*.py, with its source)."""
    return {"method": (method, f"{source_table} row {method}"),
            "schedule": ("paper", "the method's own schedule, as ABSLD App. A.3 trains baselines "
                                  "('we strictly follow original setting')")}


def _row(*numbers: float) -> Dict[str, Tuple[float, float, float]]:
    attacks = ("clean", "fgsm", "pgd", "cw", "aa")
    return {a: tuple(numbers[3 * k: 3 * k + 3]) for k, a in enumerate(attacks)}


def _absld(student, teacher, extra=None) -> Dict[str, Tuple[object, str]]:
    return {**ABSLD_CIFAR, "student": student, "arch": teacher, **(extra or {})}


T1, T2, T3, T4, T5 = (f"ABSLD paper Table {k}" for k in range(1, 6))
R18 = ("resnet18", "ABSLD paper Sec. 5.1 (students: ResNet-18 and MobileNet-v2)")
MBV2 = ("mobilenetv2", "ABSLD paper Sec. 5.1 (students: ResNet-18 and MobileNet-v2)")
PRN18_TINY = ("preactresnet18", "ABSLD paper App. A.5 (PreActResNet-18; the authors publish no Tiny-ImageNet "
                                "code: the CFA model.py form, final bn, global pooling at 64 px)")
TINY = {
    "epochs": (100, "ABSLD paper App. A.5 ('We train with PreActResNet-18 with 100 epochs')"),
    "milestones": ("72,87,95", "robaudit's rule (215, 260, 285 of 300 at the same fractions of 100 epochs, "
                               "train.scale_milestones); App. A.5 says only 'other settings are the same as "
                               "CIFAR-100'"),
}

PRESETS: Dict[str, Preset] = {p.name: p for p in [
    Preset("absld-cifar10-resnet18", f"{T1} row ABSLD (CIFAR-10, ResNet-18)", "cifar10",
           _absld(R18, CIFAR10_TEACHER), _row(83.04, 68.10, .103, 59.83, 40.50, .202, 54.50, 36.50, .216,
                                             51.77, 32.80, .249, 50.25, 31.00, .256)),
    Preset("absld-cifar10-mobilenetv2", f"{T2} row ABSLD (CIFAR-10, MobileNet-v2)", "cifar10",
           _absld(MBV2, CIFAR10_TEACHER), _row(82.54, 69.50, .102, 58.55, 41.40, .207, 52.99, 35.70, .224,
                                              50.39, 31.90, .254, 48.71, 30.30, .259)),
    Preset("absld-cifar100-resnet18", f"{T3} row ABSLD (CIFAR-100, ResNet-18)", "cifar100",
           _absld(R18, CIFAR100_TEACHER, {"tau_min": (0.8, f"{A3} (ResNet-18 on CIFAR-100: 3 and 0.8)"),
                                          "tau_max": (3.0, f"{A3} (ResNet-18 on CIFAR-100: 3 and 0.8)")}),
           _row(56.76, 31.90, .258, 34.93, 12.40, .470, 32.44, 10.50, .500, 26.99, 6.40, .578,
                25.39, 5.60, .601),
           note="the issue called this Table 4; in the paper Table 3 is ResNet-18 and Table 4 MobileNet-v2"),
    Preset("absld-cifar100-mobilenetv2", f"{T4} row ABSLD (CIFAR-100, MobileNet-v2)", "cifar100",
           _absld(MBV2, CIFAR100_TEACHER), _row(56.66, 32.00, .252, 33.87, 12.80, .448, 31.24, 11.40, .489,
                                               26.41, 7.50, .564, 24.57, 6.70, .597)),
    Preset("absld-tinyimagenet-preactresnet18", f"{T5} row ABSLD (Tiny-ImageNet, PreActResNet-18)", "tinyimagenet",
           _absld(PRN18_TINY, TINY_TEACHER, {
               **TINY, "tau_min": (0.9, "ABSLD paper App. A.5 (maximum and minimum 1.1 and 0.9)"),
               "tau_max": (1.1, "ABSLD paper App. A.5 (maximum and minimum 1.1 and 0.9)"),
               "no_augment": (False, "random crop 64 with padding 4 + flip: the CIFAR code's RandomCrop(32, "
                                     "padding=4) at 64 px (App. A.5: 'other settings are the same')")}),
           _row(47.70, 17.90, .171, 25.93, 5.80, .291, 23.41, 4.60, .313, 19.62, 3.40, .353, 17.70, 2.30, .386)),
    # Baselines, each under its own schedule (the method's paper_schedule).
    Preset("sat-cifar10-resnet18", f"{T1} row SAT", "cifar10", {**_schedule("sat", T1), "student": R18},
           _row(84.03, 63.90, .118, 56.71, 26.70, .283, 49.34, 21.00, .332, 48.99, 19.90, .352, 46.44, 16.80, .385)),
    Preset("trades-cifar10-resnet18", f"{T1} row TRADES", "cifar10", {**_schedule("trades", T1), "student": R18},
           _row(81.45, 67.60, .113, 56.65, 36.60, .267, 51.78, 30.40, .301, 49.15, 27.10, .341, 48.17, 25.90, .350)),
    Preset("rslad-cifar10-resnet18", f"{T1} row RSLAD", "cifar10",
           {**_schedule("rslad", T1), "student": R18, "arch": CIFAR10_TEACHER},
           _row(82.94, 66.30, .122, 59.51, 34.70, .244, 54.00, 28.50, .276, 52.51, 27.00, .296, 51.25, 25.50, .304)),
    Preset("fair-ard-cifar10-resnet18", f"{T1} row Fair-ARD", "cifar10",
           {**_schedule("fair-ard", T1), "student": R18, "arch": CIFAR10_TEACHER},
           _row(83.81, 69.40, .112, 58.41, 38.50, .251, 50.91, 29.90, .296, 49.96, 28.30, .312, 47.97, 25.10, .338)),
    Preset("cfa-cifar10", f"{T1} row CFA (ResNet-18, TRADES+CFA: App. A.3)", "cifar10",
           {**_schedule("cfa", T1), "student": R18},
           _row(78.64, 63.60, .123, 57.95, 36.80, .231, 54.42, 33.30, .258, 50.91, 27.50, .288, 50.37, 26.70, .296),
           note="the CFA paper's own network is PreActResNet-18 (PKU-ML/CFA train.py --model PRN): "
                "add --student preactresnet18 for it; its numbers are not in the papers robaudit holds"),
    Preset("rslad-tinyimagenet-preactresnet18", f"{T5} row RSLAD", "tinyimagenet",
           {**_schedule("rslad", T5), "student": PRN18_TINY, "arch": TINY_TEACHER, **TINY},
           _row(47.95, 15.60, .194, 26.82, 4.60, .314, 24.68, 4.10, .334, 20.58, 1.50, .385, 18.78, 0.90, .425)),
    Preset("cfa-tinyimagenet-preactresnet18", f"{T5} row CFA", "tinyimagenet",
           {**_schedule("cfa", T5), "student": PRN18_TINY, **TINY},
           _row(46.75, 17.50, .189, 23.19, 3.00, .357, 20.73, 2.30, .385, 16.83, 1.20, .448, 15.99, 0.90, .468)),
    Preset("ferd-cifar10-resnet18", "FERD paper, CIFAR-10 (WRN-34-10 teacher, ResNet-18 student; "
                                    "../shared/specs/methods.md FERD)", "cifar10",
           {"method": ("ferd", "FERD (data-free)"), "student": R18,
            "arch": ("wrn-34-10", "FERD paper reference setting (methods.md FERD: WRN-34-10 teacher)"),
            "schedule": ("paper", "FERD's own schedule (remediate/ferd.py paper_schedule: the authors' "
                                  "test.py / test.sh, 220 epochs, cosine)")},
           {"aa": (40.12, 20.80, .325)}),
]}

# The remediate options a preset may set, and how each is shown as a flag.
PRESET_OPTIONS = ("method", "student", "arch", "schedule", "epochs", "lr", "momentum", "weight_decay",
                  "batch_size", "milestones", "steps", "eps", "beta", "tau_min", "tau_max", "no_augment")


def list_presets() -> List[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    preset = PRESETS.get((name or "").strip().lower())
    if preset is None:
        raise UserError(f"unknown --preset {name!r}; choose one of: {', '.join(list_presets())} "
                        f"(robaudit list --presets)")
    return preset


def apply_preset(name: str, params: dict, given: set) -> Tuple[dict, dict]:
    """(params with the preset's values where the user gave no flag, the results.json record).

    `params`: the command's parameters by name; `given`: the names the command line set
    explicitly. Each given value that differs from the preset's is an override.
    """
    preset = get_preset(name)
    resolved = dict(params)
    values, overrides = {}, {}
    for key, (value, source) in preset.values.items():
        values[key] = {"value": value, "source": source}
        if key in given:
            if _same(params[key], value):
                continue
            overrides[key] = {"preset": value, "given": params[key]}
        else:
            resolved[key] = value
    note = preset.note or None
    if "epochs" in overrides and "milestones" in preset.values and "milestones" not in given:
        # The preset's milestones belong to its epoch count: with other --epochs they are
        # scaled to the same fractions (train.scale_milestones), as without a preset.
        resolved["milestones"] = None
        overrides["milestones"] = {"preset": preset.values["milestones"][0],
                                   "given": "scaled to --epochs (robaudit's rule)"}
    record = {"name": preset.name, "row": preset.row, "dataset": preset.dataset, "values": values,
              "overrides": overrides, "note": note}
    return resolved, record


def _same(given, value) -> bool:
    try:
        return float(given) == float(value)
    except (TypeError, ValueError):
        return str(given).strip().lower() == str(value).strip().lower()


def check_dataset(record: dict, dataset_name: str) -> Optional[str]:
    """A note (recorded as an override) when the data is not the preset's dataset, else None."""
    if dataset_name.lower() == record["dataset"]:
        return None
    record["overrides"]["dataset"] = {"preset": record["dataset"], "given": dataset_name}
    return (f"preset {record['name']} is the {record['dataset']} setting; training on {dataset_name} "
            f"(recorded as an override)")
