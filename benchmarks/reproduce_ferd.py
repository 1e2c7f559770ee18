"""Data-free FERD student vs data-based ABSLD student from the same teacher (issue 6 evidence).

    python benchmarks/reproduce_ferd.py --quick    # smoke test, a few minutes on 2 CPU cores
    python benchmarks/reproduce_ferd.py            # the evidence run (GPU advised: --device cuda)

Teacher: the adversarially trained SmallCNN of benchmarks/train_models.py, loaded from
its best.pt (weights + --arch smallcnn, i.e. an eager PyTorch module whose BatchNorm
layers FERD's DeepInversion loss can hook; the .pt2 export would hide them), or any
--teacher FILE with --arch. Students: SmallCNN from random init, same seed.

- absld:          run_remediate(method="absld") on the subset's 5085 training images
                  (20 per class held out for checkpoint selection) - the data-based reference.
- ferd:           run_ferd (remediate/ferd.py) from the teacher alone, FAE + class
                  reweighting + UTA on (the defaults).
- ferd-baseline:  run_ferd with fae/reweight/uta off: plain data-free robust distillation
                  (skip with --no-baseline).

Every student, and the teacher, is audited by engine.run_scan on the subset's test
images (first --audit-limit; default all 1017) with --audit-attacks (default clean,
pgd, cw: PGD-20 and CW-30 at eps 8/255; add aa for AutoAttack on a GPU). The table
shows per attack avg / worst class / NSD (population SD / mean) and the worst class's
Wilson 95% interval; with ~100 test images per class a class accuracy carries about
+-5 points of sampling error, so differences inside the intervals are not evidence.

Runs can be split over processes (one per core is faster than one process with two
threads on a small CPU): `--variants teacher,absld,ferd-baseline` in one and `--variants
ferd` in another, same options, then `--variants ''` prints the joint table from the run
folders (docs/reproduction.md has the exact commands of the recorded run).

Scale. The spec's FERD schedule is 220 epochs (20 warm-up), 200 generator steps,
256 synthetic images per epoch and (our default) 400 student steps per epoch; ABSLD's is
300 epochs. The defaults here are smaller (--ferd-epochs 60, --kd-steps 100,
--absld-epochs 60); pass the paper values on a GPU for a paper-scale run. Outputs:
benchmarks/_results/reproduce_ferd/<run>/ (checkpoints, metrics.csv, student audits
with report.html) and benchmarks/_results/reproduce_ferd[_quick].json; the markdown
table printed at the end is the one for docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import common


def audit_row(name: str, results: dict, seconds, attacks) -> dict:
    row = {"model": name, "seconds": None if seconds is None else round(seconds, 1)}
    for attack in attacks:
        block = results["attacks"].get(attack)
        if block is None:
            continue
        worst = next(c for c in block["per_class"] if c["class"] == block["worst_class"])
        row[attack] = {"avg": block["avg"], "worst": block["worst"], "worst_class": block["worst_class"],
                       "worst_ci95": worst["ci95"], "nsd": block["nsd"]}
    return row


def fmt_cell(cell) -> str:
    if cell is None:
        return "-"
    nsd = "-" if cell["nsd"] is None else f"{cell['nsd']:.3f}"
    lo, hi = cell["worst_ci95"]
    return (f"{100 * cell['avg']:.1f} / {100 * cell['worst']:.1f} ({cell['worst_class']}, "
            f"{100 * lo:.0f}-{100 * hi:.0f}) / {nsd}")


def samples_file(out_root: Path, key: str) -> Path:
    return out_root / key / ("samples.npz" if key == "teacher" else "student/samples.npz")


def exact_mcnemar(a, b):
    """(a-only, b-only, two-sided exact McNemar p) for paired boolean per-sample flags."""
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return a_only, b_only, p


def paired_lines(out_root: Path, keys, attacks) -> list:
    """Paired comparisons on the same test images: every model pair's per-sample flags."""
    import numpy as np

    flags = {k: np.load(samples_file(out_root, k)) for k in keys if samples_file(out_root, k).is_file()}
    pairs = [("ferd", "absld"), ("ferd", "ferd-baseline"), ("absld", "teacher"), ("ferd", "teacher"),
             ("ferd-baseline", "teacher")]
    lines = []
    for a, b in pairs:
        if a not in flags or b not in flags or not np.array_equal(flags[a]["index"], flags[b]["index"]):
            continue
        agree = float((flags[a]["clean_pred"] == flags[b]["clean_pred"]).mean())
        cells = []
        for attack in attacks:
            name = f"robust_{attack}"
            if name in flags[a].files and name in flags[b].files:
                a_only, b_only, p = exact_mcnemar(flags[a][name].astype(bool), flags[b][name].astype(bool))
                cells.append(f"{attack}: {a_only} vs {b_only} (p={p:.3f})")
        lines.append(f"{a} vs {b}: clean predictions agree on {100 * agree:.1f}%; "
                     f"points only {a} / only {b} keeps: " + ", ".join(cells))
    return lines


VARIANTS = ("teacher", "absld", "ferd", "ferd-baseline")
LABELS = {"teacher": "teacher", "absld": "absld (data)", "ferd": "ferd (data-free)",
          "ferd-baseline": "data-free baseline"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    parser.add_argument("--data", default=None, help="the CIFAR-10 subset .npz (default ../shared/data/...)")
    parser.add_argument("--models-dir", default=None, help="where train_models.py wrote the teacher")
    parser.add_argument("--teacher", default=None, help="teacher file (default <models-dir>/adversarial/best.pt)")
    parser.add_argument("--arch", default="smallcnn", help="teacher architecture for a weights file")
    parser.add_argument("--student", default="smallcnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="which runs to (re)do, comma-separated from " + ", ".join(VARIANTS) +
                             "; the table covers every run found in the output folder, so variants can "
                             "run in separate processes (one per core) and a last call with "
                             "--variants '' prints the joint table")
    parser.add_argument("--ferd-epochs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=None, help="FERD warm-up epochs (default 20/220 of them)")
    parser.add_argument("--g-steps", type=int, default=200)
    parser.add_argument("--synthesis-batch", type=int, default=256)
    parser.add_argument("--ngf", type=int, default=64, help="generator width (spec: 64, i.e. conv 128 -> 64)")
    parser.add_argument("--kd-steps", type=int, default=100)
    parser.add_argument("--bank-size", type=int, default=50_000)
    parser.add_argument("--absld-epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="inner PGD steps of both students' training")
    parser.add_argument("--audit-attacks", default="clean,pgd,cw")
    parser.add_argument("--audit-limit", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip the all-off FERD baseline")
    parser.add_argument("--out", default=None, help="default benchmarks/_results/reproduce_ferd[_quick]/")
    common.add_threads_option(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)

    from robaudit.audit.data.datasets import load_dataset
    from robaudit.audit.devices import resolve_device
    from robaudit.audit.engine import ScanConfig
    from robaudit.audit.scan_outputs import scan_and_report
    from robaudit.audit.models.loading import load_model
    from robaudit.remediate.ferd import run_ferd
    from robaudit.remediate.train import RemediateConfig, run_remediate

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        common.die(f"unknown --variants {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if args.no_baseline and "ferd-baseline" in variants:
        variants.remove("ferd-baseline")
    if args.quick:
        args.ferd_epochs, args.warmup, args.g_steps, args.synthesis_batch = 3, 1, 5, 64
        args.kd_steps, args.absld_epochs, args.batch_size, args.steps = 5, 1, 64, 2
        args.audit_limit = args.audit_limit or 100
        args.bank_size = min(args.bank_size, 128)
    tag = "reproduce_ferd_quick" if args.quick else "reproduce_ferd"
    out_root = Path(args.out) if args.out else common.RESULTS_DIR / tag
    path = common.data_path(args.data)
    info = common.machine()
    print(common.machine_line(info))
    device = str(resolve_device(args.device))
    attacks = [a.strip() for a in args.audit_attacks.split(",") if a.strip()]
    test = common.load_split(path, "test", limit=args.audit_limit)
    models_dir = common.models_dir(args.models_dir, args.quick)
    teacher_path = Path(args.teacher) if args.teacher else models_dir / "adversarial" / "best.pt"
    command = "benchmarks/reproduce_ferd.py " + " ".join(sys.argv[1:])
    out_root.mkdir(parents=True, exist_ok=True)

    if variants:
        if not teacher_path.is_file():
            quick = " --quick" if args.quick else ""
            common.die(f"teacher {teacher_path} is missing: run `python benchmarks/train_models.py{quick}` first "
                       f"(or pass --teacher FILE --arch NAME)")
        teacher = load_model(str(teacher_path), arch=args.arch, num_classes=10, device=device,
                             input_shape=tuple(test.x.shape[1:]))
    common_cfg = dict(student=args.student, batch_size=args.batch_size, steps=args.steps, seed=args.seed,
                      device=device, progress=False, export_formats=("pt2",), audit_attacks=attacks,
                      command=command)
    ferd_options = {"g_steps": args.g_steps, "synthesis_batch_size": args.synthesis_batch,
                    "kd_steps": args.kd_steps, "bank_size": args.bank_size, "ngf": args.ngf}
    if args.warmup is not None:
        ferd_options["warmup"] = args.warmup
    switches_off = {"fae": False, "reweight": False, "uta": False}

    for key in variants:
        run_dir = out_root / key
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        summary = {"variant": key, "teacher": str(teacher_path), "args": vars(args), "machine": info}
        if key == "teacher":
            results = scan_and_report(ScanConfig(out_dir=run_dir, attacks=attacks, seed=args.seed, device=device,
                                          command=command), model=teacher, data=test)
        elif key == "absld":
            train = (load_dataset(str(path), split="train", n_per_class=30) if args.quick
                     else common.load_split(path, "train"))
            absld = run_remediate(RemediateConfig(out_dir=run_dir, method="absld", epochs=args.absld_epochs,
                                                  val_per_class=5 if args.quick else 20,
                                                  val_steps=2 if args.quick else 10,
                                                  dataset=train.name, **common_cfg),
                                  teacher=teacher, train_data=train, test_data=test)
            results = absld["student_results"]
            summary["run"] = {"epochs": absld["epochs"], "selected_epoch": absld["selected_epoch"],
                              "training_options": absld["training"]["options"]}
        else:
            switches = switches_off if key == "ferd-baseline" else {}
            ferd = run_ferd(RemediateConfig(out_dir=run_dir, method="ferd", epochs=args.ferd_epochs,
                                            method_options={**ferd_options, **switches}, **common_cfg),
                            teacher=teacher, test_data=test)
            results = ferd["student_results"]
            training = ferd["training"]
            summary["run"] = {"epochs": ferd["epochs"], "bank_size": ferd["bank_size"],
                              "training_options": training["options"],
                              "class_probabilities_last": training["class_probabilities"][-1]}
            for note in training["options"].get("notes", []):
                print(f"{key}: note: {note}")
        summary["seconds"] = time.perf_counter() - t0
        summary["row"] = audit_row(LABELS[key], results, summary["seconds"], attacks)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"{key}: done in {summary['seconds']:.0f} s")

    # The table: every run found in out_root (this process's and earlier ones').
    summaries = {}
    for key in VARIANTS:
        file = out_root / key / "summary.json"
        if file.is_file():
            summaries[key] = json.loads(file.read_text())
    if not summaries:
        common.die(f"no finished run in {out_root}: run some --variants first")
    rows = [summaries[k]["row"] for k in VARIANTS if k in summaries]
    shown = [a for a in attacks if any(a in r for r in rows)]
    headers = ["model", "seconds"] + [f"{a} avg / worst (class, 95% CI) / NSD" for a in shown]
    table_rows = [[r["model"], r["seconds"]] + [fmt_cell(r.get(a)) for a in shown] for r in rows]
    teachers = {s["teacher"] for s in summaries.values()}
    if len(teachers) > 1:
        print(f"WARNING: the runs in {out_root} used different teachers: {sorted(teachers)}")
    print(f"\nteacher {', '.join(sorted(teachers))} ({args.arch}); test = first {len(test.y)} CIFAR-10 subset "
          f"test images; eps 8/255; accuracies in %")
    print(common.table(headers, table_rows))
    print("\nfor docs/reproduction.md:\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in table_rows:
        print("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    paired = paired_lines(out_root, list(summaries), shown)
    if paired:
        print("\npaired on the same test images (exact McNemar test, two-sided):")
        for line in paired:
            print("- " + line)
    result = common.write_result(tag, {"machine": info, "data": str(path), "teachers": sorted(teachers),
                                       "rows": rows, "runs": {k: s.get("run") for k, s in summaries.items()},
                                       "args": {k: s["args"] for k, s in summaries.items()},
                                       "paired": paired, "out": str(out_root)})
    print(f"\nruns in {out_root}; results in {result}")


if __name__ == "__main__":
    main()
