"""ABSLD vs RSLAD / Fair-RSLAD / SAT students from one robust teacher, several seeds (issue 5 §2).

    python benchmarks/reproduce_absld.py --quick --no-aa   # smoke test, ~2 min on 2 CPU cores (AA adds minutes)
    python benchmarks/reproduce_absld.py            # study A of docs/reproduction.md: ~30 min on 2 shared CPU cores
    python benchmarks/reproduce_absld.py --teacher benchmarks/_results/reproduce_absld/teacher/best.pt \
        --epochs 10 --distill-loss-scale 1 --out benchmarks/_results/reproduce_absld_b   # study B

What it does, all through robaudit's Python API (no method is re-implemented here):

1. Teacher: run_remediate(method="sat", teacher=None) on the training images of the
   CIFAR-10 subset (../shared/data/cifar10_subset.npz; all 5085 by default,
   --teacher-n-per-class to reduce), SmallCNN, --teacher-epochs 10, PGD-3 inner attack;
   loaded back from its best.pt with robaudit.audit.loading.load_model. Skipped when
   --teacher FILE (+ --teacher-arch) is given.
2. Students: run_remediate(method=m, teacher=that teacher) for m in sat, rslad,
   fair-rslad, absld and every seed of --seeds (0,1,2), at equal budget: same
   architecture (SmallCNN), training images (--n-per-class 200 per class of the train
   split), epochs (--epochs 7), inner attack (PGD-3, step 3/255: three steps of the
   paper's 2/255 could not reach the 8/255 boundary), lr schedule (SGD 0.1, the paper's
   milestones 215/260/285 of 300 scaled to the epochs), checkpoint selection
   (PGD-`--val-steps` 10 on --val-per-class 20 held-out training images per class; the
   held-out split is drawn with the seed, so it is the same for every method at one
   seed). The SAT student does not use the teacher. Every method runs with robaudit's
   defaults otherwise (ABSLD: beta 0.1 decayed at the milestones, tau in [0.5, 5]).
   Each student is audited by run_remediate's own engine.run_scan on the subset's test
   images (all 1017) with clean and PGD-20 (eps 8/255, step 2/255, robaudit defaults:
   worst over iterates, clean-correct required).
3. AutoAttack (reference pyautoattack, standard version) costs minutes per model on
   CPU even on a few images: after all training it runs on the students of --aa-seeds
   (default seed 0 only) on a class-balanced test subset of --audit-n-per-class images
   per class (default 10, i.e. 100 images; PGD-20 is re-run on the same images for
   comparison). Those numbers carry very wide per-class intervals (about +-30 points).
4. Prints and writes, per method, mean +- sample SD (ddof 1) over seeds of clean avg,
   PGD-20 avg / worst class / NSD and AA avg / worst / NSD, the per-class PGD-20 table
   (mean over seeds, with the mean of the per-seed Wilson 95% intervals), the ABSLD
   temperatures of the last epoch, and comparison reports (report.py comparison mode:
   each student vs the RSLAD student of the same seed; the ABSLD one shows the
   temperature trajectories) under <out>/compare/.

--deadline HH:MM (UTC) stops starting new student trainings after that time, and
--aa-deadline new AA audits, so a shared machine still yields partial, labelled figures.
Everything lands in benchmarks/_results/reproduce_absld[_quick]/ (+ .json, table.md;
git-ignored). docs/reproduction.md records the configuration and the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import time
from pathlib import Path

import common

METHODS = ("sat", "rslad", "fair-rslad", "absld")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def past(deadline) -> bool:
    return deadline is not None and now_utc() >= deadline


def parse_deadline(text):
    if not text:
        return None
    hh, mm = (int(v) for v in text.split(":"))
    today = now_utc()
    return today.replace(hour=hh, minute=mm, second=0, microsecond=0)


def block_summary(results: dict, attack: str):
    block = results["attacks"].get(attack)
    if block is None:
        return None
    return {"avg": block["avg"], "worst": block["worst"], "worst_class": block["worst_class"],
            "nsd": block["nsd"], "n": sum(c["n"] for c in block["per_class"]),
            "per_class": [{"class": c["class"], "n": c["n"], "correct": c["correct"],
                           "accuracy": c["accuracy"], "ci95": c["ci95"]} for c in block["per_class"]],
            "seconds": block.get("seconds")}


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    if len(values) == 1:
        return values[0], None, 1
    return statistics.mean(values), statistics.stdev(values), len(values)


def fmt(values, scale=100.0, digits=1) -> str:
    m, sd, n = mean_sd(values)
    if m is None:
        return "-"
    if sd is None:
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, 1 seed: a smoke test")
    parser.add_argument("--data", default=None, help="the CIFAR-10 subset .npz (default ../shared/data/...)")
    parser.add_argument("--n-per-class", type=int, default=200,
                        help="students' training images per class from the subset's train split (default 200)")
    parser.add_argument("--teacher-n-per-class", type=int, default=None,
                        help="teacher's training images per class (default: the whole train split, 5085)")
    parser.add_argument("--val-per-class", type=int, default=20, help="held out of those for selection")
    parser.add_argument("--val-steps", type=int, default=10, help="PGD steps of the selection attack")
    parser.add_argument("--student", default="smallcnn")
    parser.add_argument("--teacher", default=None, help="an existing teacher file (skips teacher training)")
    parser.add_argument("--teacher-arch", default="smallcnn")
    parser.add_argument("--teacher-method", default="sat", choices=("sat", "trades"))
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--teacher-steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=7, help="student epochs (paper: 300)")
    parser.add_argument("--steps", type=int, default=3, help="inner PGD steps, teacher and students (paper: 10)")
    parser.add_argument("--step-size", default="3/255", help="inner PGD step (paper: 2/255 with 10 steps; "
                        "3 steps of 2/255 could not reach the 8/255 boundary)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--distill-loss-scale", type=float, default=None,
                        help="loss_scale of rslad / fair-rslad / absld (robaudit default 0.1 = the code's "
                             "(batch-mean KL)/10; 1 = plain batch mean, 10x larger distillation gradients)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--test-limit", type=int, default=None, help="first N test images (default all)")
    parser.add_argument("--audit-n-per-class", type=int, default=10, help="AA test images per class")
    parser.add_argument("--aa-seeds", default="0", help="seeds whose students get the AA audit (slow on CPU)")
    parser.add_argument("--aa-deadline", default=None, help="UTC HH:MM after which no AA audit starts")
    parser.add_argument("--no-aa", action="store_true", help="skip AutoAttack")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM after which nothing new starts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="default benchmarks/_results/reproduce_absld[_quick]/")
    args = parser.parse_args()

    import torch
    from robaudit.audit.datasets import load_dataset
    from robaudit.audit.engine import ScanConfig, run_scan
    from robaudit.audit.loading import load_model
    from robaudit.audit.report import render_report
    from robaudit.remediate.train import RemediateConfig, run_remediate, scale_milestones

    if args.quick:
        args.n_per_class, args.val_per_class, args.val_steps = 30, 5, 2
        args.teacher_epochs, args.teacher_steps, args.epochs, args.steps = 1, 2, 1, 2
        args.seeds = args.seeds if args.seeds != "0,1,2" else "0"
        args.test_limit = args.test_limit or 100
        args.audit_n_per_class = min(args.audit_n_per_class, 3)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    deadline = parse_deadline(args.deadline)
    aa_deadline = parse_deadline(args.aa_deadline) or deadline
    aa_seeds = {int(v) for v in args.aa_seeds.split(",") if v.strip()}
    from robaudit.audit.engine import parse_eps
    step_size = parse_eps(args.step_size)
    tag = "reproduce_absld_quick" if args.quick else "reproduce_absld"
    out_root = Path(args.out) if args.out else common.RESULTS_DIR / tag
    if args.out:  # results json named after the run folder, so two studies never overwrite one another
        tag = out_root.name
    path = common.data_path(args.data)
    info = common.machine()
    print(common.machine_line(info), flush=True)
    command = "benchmarks/reproduce_absld.py" + (" --quick" if args.quick else "")

    train = load_dataset(str(path), split="train", n_per_class=args.n_per_class)
    teacher_train = (train if args.quick else
                     load_dataset(str(path), split="train", n_per_class=args.teacher_n_per_class))
    test = load_dataset(str(path), split="test", limit=args.test_limit)
    aa_test = load_dataset(str(path), split="test", n_per_class=args.audit_n_per_class)
    print(f"teacher train {len(teacher_train.y)} images, students' train {len(train.y)} images ({args.val_per_class}/class held out), test {len(test.y)}, "
          f"AA subset {len(aa_test.y)}; milestones {scale_milestones(args.epochs)} of {args.epochs} epochs",
          flush=True)
    if out_root.exists():
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True)
    payload = {"machine": info, "data": str(path), "args": vars(args), "command": command,
               "train_images": len(train.y), "teacher_train_images": len(teacher_train.y), "test_images": len(test.y), "aa_images": len(aa_test.y),
               "milestones": list(scale_milestones(args.epochs)), "teacher": None, "runs": [], "skipped": []}
    result_path = None

    def save():
        nonlocal result_path
        result_path = common.write_result(tag, payload)

    # 1. teacher -------------------------------------------------------------------
    t0 = time.perf_counter()
    if args.teacher:
        teacher_file = Path(args.teacher)
        teacher_info = {"file": str(teacher_file), "arch": args.teacher_arch, "trained_here": False}
    else:
        tcfg = RemediateConfig(out_dir=out_root / "teacher", method=args.teacher_method, student=args.teacher_arch,
                               epochs=args.teacher_epochs, steps=args.teacher_steps, step_size=step_size, batch_size=args.batch_size,
                               val_per_class=args.val_per_class, val_steps=args.val_steps, seed=0,
                               device=args.device, progress=False, export_formats=("pt2",),
                               audit_attacks=["clean", "pgd"], dataset=train.name,
                               command=command + " (teacher)")
        tsum = run_remediate(tcfg, teacher=None, train_data=teacher_train, test_data=test)
        teacher_file = Path(tsum["best"])
        teacher_info = {"file": str(teacher_file), "arch": args.teacher_arch, "trained_here": True,
                        "method": args.teacher_method, "epochs": args.teacher_epochs,
                        "inner_steps": args.teacher_steps, "selected_epoch": tsum["selected_epoch"],
                        "clean": block_summary(tsum["student_results"], "clean"),
                        "pgd": block_summary(tsum["student_results"], "pgd")}
    teacher_info["seconds"] = round(time.perf_counter() - t0, 1)
    teacher = load_model(str(teacher_file), arch=args.teacher_arch, num_classes=10, device=args.device,
                         input_shape=tuple(test.x.shape[1:]))
    payload["teacher"] = teacher_info
    save()
    if teacher_info.get("pgd"):
        print(f"teacher ({teacher_info['seconds']} s): clean {common.pct(teacher_info['clean']['avg'])}, "
              f"PGD-20 {common.pct(teacher_info['pgd']['avg'])} worst {common.pct(teacher_info['pgd']['worst'])} "
              f"NSD {teacher_info['pgd']['nsd']:.3f}", flush=True)

    # 2. students --------------------------------------------------------------------
    student_results = {}
    for seed in seeds:
        for method in methods:
            if past(deadline):
                payload["skipped"].append({"seed": seed, "method": method, "why": "deadline (training)"})
                print(f"skip {method} seed {seed}: past the deadline", flush=True)
                continue
            t0 = time.perf_counter()
            cfg = RemediateConfig(out_dir=out_root / f"{method}_s{seed}", method=method, student=args.student,
                                  epochs=args.epochs, steps=args.steps, step_size=step_size, batch_size=args.batch_size,
                                  val_per_class=args.val_per_class, val_steps=args.val_steps, seed=seed,
                                  device=args.device, progress=False, export_formats=("pt2",),
                                  audit_attacks=["clean", "pgd"], dataset=train.name,
                                  method_options=({"loss_scale": args.distill_loss_scale}
                                                  if args.distill_loss_scale and method != "sat" else {}),
                                  command=f"{command} ({method}, seed {seed})")
            summary = run_remediate(cfg, teacher=None if method == "sat" else teacher,
                                    train_data=train, test_data=test)
            seconds = time.perf_counter() - t0
            results = summary["student_results"]
            student_results[(method, seed)] = results
            training = summary["training"]
            run = {"method": method, "seed": seed, "seconds": round(seconds, 1), "dir": str(cfg.out_dir),
                   "best": summary["best"], "selected_epoch": summary["selected_epoch"],
                   "clean": block_summary(results, "clean"), "pgd": block_summary(results, "pgd"),
                   "aa": None, "aa_subset_pgd": None, "aa_subset_clean": None,
                   "temperatures_selected": None, "class_weights_last": None}
            temps = training.get("temperatures") if isinstance(training, dict) else None
            if temps:
                run["temperatures"] = temps
            payload["runs"].append(run)
            save()
            print(f"{method:10s} seed {seed}: {seconds:6.0f} s, selected epoch {summary['selected_epoch']}, "
                  f"clean {common.pct(run['clean']['avg'])}, PGD-20 {common.pct(run['pgd']['avg'])} "
                  f"worst {common.pct(run['pgd']['worst'])} ({run['pgd']['worst_class']}) "
                  f"NSD {run['pgd']['nsd']:.3f}", flush=True)

    # 3. AutoAttack on the class-balanced subset --------------------------------------
    if not args.no_aa:
        for run in payload["runs"]:
            if run["seed"] not in aa_seeds:
                continue
            if past(aa_deadline):
                payload["skipped"].append({"seed": run["seed"], "method": run["method"], "why": "deadline (AA)"})
                print(f"skip AA of {run['method']} seed {run['seed']}: past the deadline", flush=True)
                continue
            t0 = time.perf_counter()
            model = load_model(run["best"], arch=args.student, num_classes=10, device=args.device,
                               input_shape=tuple(test.x.shape[1:]))
            res = run_scan(ScanConfig(out_dir=Path(run["dir"]) / "aa_audit", attacks=["clean", "pgd", "aa"],
                                      seed=run["seed"], device=args.device,
                                      command=f"{command} (AA audit, {run['method']}, seed {run['seed']})"),
                           model=model, data=aa_test)
            run["aa"] = block_summary(res, "aa")
            run["aa_subset_pgd"] = block_summary(res, "pgd")
            run["aa_subset_clean"] = block_summary(res, "clean")
            run["aa_seconds"] = round(time.perf_counter() - t0, 1)
            save()
            print(f"AA {run['method']:10s} seed {run['seed']}: {run['aa_seconds']:5.0f} s on {len(aa_test.y)} "
                  f"images: AA {common.pct(run['aa']['avg'])} worst {common.pct(run['aa']['worst'])} "
                  f"(PGD-20 on the same images {common.pct(run['aa_subset_pgd']['avg'])})", flush=True)

    # 4. comparison reports (each student vs the RSLAD student of the same seed) -------
    compare_dir = out_root / "compare"
    reports = []
    for (method, seed), results in student_results.items():
        base = student_results.get(("rslad", seed))
        if method == "rslad" or base is None:
            continue
        out = render_report(results, compare_dir / f"{method}_vs_rslad_seed{seed}.html", baseline=base)
        reports.append(str(out))
    payload["reports"] = reports

    # 5. tables --------------------------------------------------------------------------
    by_method = {m: [r for r in payload["runs"] if r["method"] == m] for m in methods}
    headers = ["method", "seeds", "clean avg", "PGD-20 avg", "PGD-20 worst", "PGD-20 NSD",
               f"AA avg (n={len(aa_test.y)})", "AA worst", "AA NSD", "train s/run"]
    rows = []
    for m, runs in by_method.items():
        if not runs:
            continue
        aa_runs = [r for r in runs if r.get("aa")]
        rows.append([m, len(runs), fmt([r["clean"]["avg"] for r in runs]),
                     fmt([r["pgd"]["avg"] for r in runs]), fmt([r["pgd"]["worst"] for r in runs]),
                     fmt([r["pgd"]["nsd"] for r in runs], scale=1, digits=3),
                     fmt([r["aa"]["avg"] for r in aa_runs]) + ("" if len(aa_runs) == len(runs) else f" ({len(aa_runs)} seeds)"),
                     fmt([r["aa"]["worst"] for r in aa_runs]),
                     fmt([r["aa"]["nsd"] for r in aa_runs], scale=1, digits=3),
                     f"{statistics.mean(r['seconds'] for r in runs):.0f}"])
    classes = list(test.classes)
    class_headers = ["class"] + [m for m in methods if by_method.get(m)]
    class_rows = []
    for k, name in enumerate(classes):
        row = [name]
        for m in class_headers[1:]:
            accs = [r["pgd"]["per_class"][k]["accuracy"] for r in by_method[m]]
            lo = statistics.mean(r["pgd"]["per_class"][k]["ci95"][0] for r in by_method[m])
            hi = statistics.mean(r["pgd"]["per_class"][k]["ci95"][1] for r in by_method[m])
            row.append(f"{100 * statistics.mean(accs):.1f} [{100 * lo:.0f}-{100 * hi:.0f}]")
        class_rows.append(row)
    tau_lines = []
    for r in by_method.get("absld", []):
        temps = r.get("temperatures")
        if isinstance(temps, dict):
            for key, traj in temps.items():
                if isinstance(traj, list) and traj:
                    last = traj[-1]
                    vals = last.get("values", last) if isinstance(last, dict) else last
                    tau_lines.append(f"seed {r['seed']} {key} (last epoch): {json.dumps(vals, default=str)}")

    lines = [f"teacher: {args.teacher_arch} {teacher_info.get('method', '(given)')}, "
             + (f"clean {common.pct(teacher_info['clean']['avg'])}, PGD-20 {common.pct(teacher_info['pgd']['avg'])} "
                f"/ worst {common.pct(teacher_info['pgd']['worst'])} / NSD {teacher_info['pgd']['nsd']:.3f}"
                if teacher_info.get("pgd") else ""),
             f"students: {args.student}, {args.epochs} epochs, PGD-{args.steps} inner, {len(train.y)} train images "
             f"({args.val_per_class}/class held out, selection PGD-{args.val_steps}); accuracies in %, "
             f"mean ± SD (ddof 1) over seeds; NSD = population SD / mean over classes",
             f"PGD-20 / clean on {len(test.y)} test images; AA (pyautoattack standard) on {len(aa_test.y)} "
             f"({args.audit_n_per_class}/class)", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", "Per-class PGD-20 robust accuracy, mean over seeds [mean of per-seed Wilson 95% CI]:", "",
              "| " + " | ".join(class_headers) + " |", "|" + "---|" * len(class_headers)]
    lines += ["| " + " | ".join(row) + " |" for row in class_rows]
    if tau_lines:
        lines += ["", "ABSLD temperatures:"] + tau_lines
    if payload["skipped"]:
        lines += ["", f"SKIPPED (deadline): {payload['skipped']}"]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out_root / "table.md").write_text(text + "\n")
    payload["table_md"] = text
    save()
    print(f"\nruns in {out_root}; results in {result_path}; comparison reports in {compare_dir}", flush=True)


if __name__ == "__main__":
    main()
