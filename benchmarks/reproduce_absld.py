"""ABSLD vs RSLAD / Fair-RSLAD / CFA / FRL (and SAT) students at equal budget, several seeds (issues 5, 15).

    python benchmarks/reproduce_absld.py --quick --no-aa   # smoke test, ~1 min on 1 CPU thread
    python benchmarks/reproduce_absld.py ... --resume      # study C of docs/reproduction.md (the command is there)

What it does, all through robaudit's Python API (no method is re-implemented here):

1. Teacher: run_remediate(method=--teacher-method, teacher=None) on the training images of
   the CIFAR-10 subset (../shared/data/cifar10_subset.npz; all 5085 by default), arch
   --teacher-arch, --teacher-epochs, PGD---teacher-steps inner attack; loaded back from its
   best.pt with robaudit.audit.models.loading.load_model. Skipped when --teacher FILE (+
   --teacher-arch) is given; --teacher-only trains it and stops.
2. Students, for every seed of --seeds and every arm of --methods, at equal budget: same
   architecture (--student), training images (--n-per-class of the train split, of which
   --val-per-class per class are held out for checkpoint selection, drawn with the seed:
   the same split for every arm at one seed), epochs, inner attack, lr schedule (SGD 0.1,
   the paper's milestones 215/260/285 of 300 scaled to the epochs). Arms:
     sat         CE on PGD examples (no teacher)
     rslad, fair-rslad, absld   distilled from the teacher (--distill-loss-scale for all three)
     cfa         CFA on TRADES, the shared schedule (calibration / FAWA starts scaled)
     frl         FRL reweight+remargin, fine-tuning the SAT student of the same seed for
                 --frl-epochs under FRL's own schedule (lr 1e-3, wd 5e-4, no milestones);
                 its budget is the SAT pre-training plus the fine-tuning (both recorded)
     absld-sb    ABSLD with the temperature rate scaled to the short schedule:
                 beta = 0.1 * 300 / epochs (--absld-sb-beta), labelled as robaudit's option
   Each student is audited by run_remediate's own engine.run_scan on the test images
   (all 1017 by default) with clean and PGD-20 (eps 8/255, step 2/255, worst over
   iterates, clean-correct required); the audit's samples.npz holds per-image outcomes.
3. --resume: a run whose run_summary.json is on disk (written when the run finished, with
   the configuration it ran under) is read back, not retrained; a run cut mid-training
   continues from its checkpoint.pt. A summary made under another configuration stops
   the script (choose another --out). Without --resume the output folder is replaced.
4. AutoAttack (pyautoattack standard, slow on CPU): after all training, on the students of
   --aa-seeds on a class-balanced test subset (--audit-n-per-class); cached per run
   (aa_summary.json). --no-aa skips it.
5. Tables (benchmarks/reproduce_stats.py): per arm mean ± SD over seeds; paired over seeds,
   ABSLD (and absld-sb) minus each baseline on worst-class PGD-20 and NSD with t intervals
   and exact sign-flip p-values; the pooled McNemar on the pair's weakest class; the ABSLD
   temperatures; comparison reports (each arm vs RSLAD of the same seed) under <out>/compare/.

--deadline HH:MM (UTC) stops starting new student trainings after that time (--aa-deadline:
AA audits), so a shared machine still yields partial, labelled figures; rerun with --resume
to finish. Everything lands in --out (default benchmarks/_results/reproduce_absld[_quick]/),
<name>.json and <out>/table.md (git-ignored). docs/reproduction.md records the figures.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import common
import reproduce_stats as rs

ARMS = ("sat", "rslad", "fair-rslad", "absld", "cfa", "frl", "absld-sb")
DEFAULT_ARMS = ("sat", "rslad", "fair-rslad", "absld", "cfa", "frl")
DISTILLED = ("rslad", "fair-rslad", "absld", "absld-sb")
ARM_METHOD = {"absld-sb": "absld"}
REFERENCES = ("absld", "absld-sb")   # the arms the paired table compares against every baseline
SUMMARY = "run_summary.json"
AA_SUMMARY = "aa_summary.json"
CLAIM = "worker.claim"
FRL_SCHEDULE = {"lr": 1e-3, "weight_decay": 5e-4, "milestones": []}   # remediate/frl.py FRL_SCHEDULE
PAPER_EPOCHS, PAPER_BETA = 300, 0.1


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def past(deadline) -> bool:
    return deadline is not None and now_utc() >= deadline


def parse_deadline(text):
    if not text:
        return None
    hh, mm = (int(v) for v in text.split(":"))
    return now_utc().replace(hour=hh, minute=mm, second=0, microsecond=0)


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def fmt_nsd(value) -> str:
    return "-" if value is None else f"{value:.3f}"   # None: every class at 0 (NSD undefined)


def block_summary(results: dict, attack: str):
    block = results["attacks"].get(attack)
    if block is None:
        return None
    return {"avg": block["avg"], "worst": block["worst"], "worst_class": block["worst_class"],
            "nsd": block["nsd"], "n": sum(c["n"] for c in block["per_class"]),
            "per_class": [{"class": c["class"], "n": c["n"], "correct": c["correct"],
                           "accuracy": c["accuracy"], "ci95": c["ci95"]} for c in block["per_class"]],
            "seconds": block.get("seconds")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings, 1 seed: a smoke test")
    p.add_argument("--data", default=None, help="the CIFAR-10 subset .npz (default ../shared/data/...)")
    p.add_argument("--n-per-class", type=int, default=200, help="students' training images per class")
    p.add_argument("--teacher-n-per-class", type=int, default=None, help="teacher's (default: all 5085)")
    p.add_argument("--val-per-class", type=int, default=20, help="held out of those for selection")
    p.add_argument("--val-steps", type=int, default=10, help="PGD steps of the selection attack")
    p.add_argument("--student", default="smallcnn")
    p.add_argument("--teacher", default=None, help="an existing teacher file (skips teacher training)")
    p.add_argument("--teacher-arch", default="smallcnn")
    p.add_argument("--teacher-method", default="sat", choices=("sat", "trades"))
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--teacher-steps", type=int, default=3)
    p.add_argument("--teacher-only", action="store_true", help="train the teacher, then stop")
    p.add_argument("--epochs", type=int, default=7, help="student epochs (paper: 300)")
    p.add_argument("--frl-epochs", type=int, default=5, help="FRL fine-tuning epochs after SAT (paper: 40)")
    p.add_argument("--frl-tolerance", type=float, default=0.05, help="FRL tolerance (ABSLD paper: 0.05)")
    p.add_argument("--absld-sb-beta", type=float, default=None,
                   help="absld-sb's temperature rate (default 0.1 * 300 / --epochs)")
    p.add_argument("--steps", type=int, default=3, help="inner PGD steps, teacher and students (paper: 10)")
    p.add_argument("--step-size", default="3/255", help="inner PGD step (paper: 2/255 with 10 steps; "
                   "3 steps of 2/255 could not reach the 8/255 boundary)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--distill-loss-scale", type=float, default=None,
                   help="loss_scale of the distilled arms (robaudit default 0.1 = the code's (batch-mean KL)/10)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT_ARMS), help=f"arms, of {', '.join(ARMS)}")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--audit-n-per-class", type=int, default=10, help="AA test images per class")
    p.add_argument("--aa-seeds", default="0", help="seeds whose students get the AA audit (slow on CPU)")
    p.add_argument("--aa-deadline", default=None, help="UTC HH:MM after which no AA audit starts")
    p.add_argument("--no-aa", action="store_true", help="skip AutoAttack")
    p.add_argument("--deadline", default=None, help="UTC HH:MM after which no training starts")
    p.add_argument("--resume", action="store_true", help="reuse finished runs on disk, continue cut ones")
    p.add_argument("--worker", default=None, help="NAME: one of several processes sharing the runs (needs "
                   "--resume and --teacher); its results json is <out>_NAME.json; rerun without it to tabulate")
    p.add_argument("--tables-only", action="store_true", help="train nothing: tabulate the finished runs on disk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="default benchmarks/_results/reproduce_absld[_quick]/")
    args = p.parse_args(argv)
    if args.quick:
        args.n_per_class, args.val_per_class, args.val_steps = 30, 5, 2
        args.teacher_epochs, args.teacher_steps, args.epochs, args.steps = 1, 2, 2, 2
        args.frl_epochs = min(args.frl_epochs, 1)
        args.seeds = args.seeds if args.seeds != "0,1,2" else "0,1"
        args.test_limit = args.test_limit or 100
        args.audit_n_per_class = min(args.audit_n_per_class, 3)
    args.arms = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    if "frl" in args.arms and "sat" not in args.arms:
        p.error("the frl arm fine-tunes the sat arm's student of the same seed: list sat too")
    if args.tables_only:
        args.resume, args.no_aa = True, True   # read what is there; never replace the folder
    if args.worker and not (args.resume and args.teacher):
        p.error("--worker needs --resume (workers share the folder) and --teacher (one teacher for all)")
    if args.absld_sb_beta is None:
        args.absld_sb_beta = PAPER_BETA * PAPER_EPOCHS / args.epochs
    return args


def arm_options(args, arm: str) -> dict:
    opts = {}
    if arm in DISTILLED and args.distill_loss_scale:
        opts["loss_scale"] = args.distill_loss_scale
    if arm == "absld-sb":
        opts["beta"] = args.absld_sb_beta
    if arm == "frl":
        opts["tolerance"] = args.frl_tolerance
    return opts


def run_key(args, arm: str, seed: int, teacher_file, n_train: int, n_test: int) -> dict:
    """What a finished run depends on: a summary on disk is reused only if this matches."""
    frl = arm == "frl"
    return {"arm": arm, "method": ARM_METHOD.get(arm, arm), "options": arm_options(args, arm), "seed": seed,
            "student": args.student, "epochs": args.frl_epochs if frl else args.epochs,
            "init_epochs": args.epochs if frl else 0, "steps": args.steps, "step_size": args.step_size,
            "batch_size": args.batch_size, "n_per_class": args.n_per_class, "train_images": n_train,
            "val_per_class": args.val_per_class, "val_steps": args.val_steps, "test_images": n_test,
            "teacher": str(teacher_file) if arm in DISTILLED else None,
            "schedule": dict(FRL_SCHEDULE) if frl else "shared"}


def read_summary(path: Path, key: dict):
    """The finished run's summary if `path` holds one made under `key`; None if absent."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != json.loads(json.dumps(key, default=str)):
        sys.exit(f"reproduce_absld: error: {path} was made under another configuration "
                 f"({saved.get('key')} vs {key}); choose another --out")
    return saved


def train_teacher(args, out_root: Path, data, step_size: float, command: str) -> dict:
    from robaudit.remediate.train import RemediateConfig, run_remediate

    if args.teacher:
        given = {"file": str(args.teacher), "arch": args.teacher_arch, "trained_here": False}
        # A teacher this script trained (--teacher-only) has its summary next to it: keep its figures.
        beside = Path(args.teacher).parent / "teacher_summary.json"
        if beside.is_file():
            saved = json.loads(beside.read_text())
            if Path(saved.get("file", "")).resolve() == Path(args.teacher).resolve():
                return {**saved, **given, "trained_by": "this script (--teacher-only)"}
        return given
    key = {"arch": args.teacher_arch, "method": args.teacher_method, "epochs": args.teacher_epochs,
           "steps": args.teacher_steps, "step_size": args.step_size, "train_images": len(data["teacher_train"].y),
           "val_per_class": args.val_per_class, "val_steps": args.val_steps, "test_images": len(data["test"].y)}
    path = out_root / "teacher" / "teacher_summary.json"
    saved = read_summary(path, key) if args.resume else None
    if saved is not None:
        print(f"teacher: reusing {path}", flush=True)
        return saved
    t0 = time.perf_counter()
    tcfg = RemediateConfig(out_dir=out_root / "teacher", method=args.teacher_method, student=args.teacher_arch,
                           epochs=args.teacher_epochs, steps=args.teacher_steps, step_size=step_size,
                           batch_size=args.batch_size, val_per_class=args.val_per_class, val_steps=args.val_steps,
                           seed=0, device=args.device, progress=False, export_formats=("pt2",),
                           audit_attacks=["clean", "pgd"], dataset=data["train"].name, resume=args.resume,
                           command=command + " (teacher)")
    tsum = run_remediate(tcfg, teacher=None, train_data=data["teacher_train"], test_data=data["test"])
    info = {"key": key, "file": tsum["best"], "arch": args.teacher_arch, "trained_here": True,
            "method": args.teacher_method, "epochs": args.teacher_epochs, "inner_steps": args.teacher_steps,
            "selected_epoch": tsum["selected_epoch"], "seconds": round(time.perf_counter() - t0, 1),
            "clean": block_summary(tsum["student_results"], "clean"),
            "pgd": block_summary(tsum["student_results"], "pgd")}
    write_json(path, info)
    return info


def read_metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def class_state_summary(training: dict) -> dict:
    """Each declared per-class state (temperatures, FRL weights / eps scales, CFA eps / beta): its
    per-epoch trajectory."""
    return {s["name"]: s["per_epoch"] for s in training.get("class_state") or []}


def train_arm(args, arm: str, seed: int, teacher, teacher_file, data, step_size: float,
              out_root: Path, command: str):
    """One student (or the cached summary of one). None if it cannot run (frl without its SAT init)."""
    from robaudit.remediate.train import RemediateConfig, run_remediate

    run_dir = out_root / f"{arm}_s{seed}"
    key = run_key(args, arm, seed, teacher_file, len(data["train"].y), len(data["test"].y))
    saved = read_summary(run_dir / SUMMARY, key) if args.resume else None
    if saved is not None:
        return saved
    frl = arm == "frl"
    sat = finished_run(args, "sat", seed, teacher_file, data, out_root) if frl else None
    if frl and sat is None:
        return None
    schedule = FRL_SCHEDULE if frl else {}
    cfg = RemediateConfig(out_dir=run_dir, method=key["method"], student=args.student,
                          student_init=sat["best"] if frl else None, epochs=key["epochs"],
                          steps=args.steps, step_size=step_size, batch_size=args.batch_size,
                          val_per_class=args.val_per_class, val_steps=args.val_steps, seed=seed,
                          device=args.device, progress=False, export_formats=("pt2",),
                          audit_attacks=["clean", "pgd"], dataset=data["train"].name,
                          method_options=arm_options(args, arm), resume=args.resume,
                          schedule="own" if frl else "shared", **schedule,
                          command=f"{command} ({arm}, seed {seed})")
    t0 = time.perf_counter()
    summary = run_remediate(cfg, teacher=teacher if arm in DISTILLED else None,
                            train_data=data["train"], test_data=data["test"])
    seconds = time.perf_counter() - t0
    results, training = summary["student_results"], summary["training"]
    metrics = read_metrics(run_dir)
    run = {"key": key, "arm": arm, "method": key["method"], "seed": seed, "seconds": round(seconds, 1),
           "train_seconds": round(sum(float(r.get("seconds") or 0) for r in metrics), 1),
           "dir": str(run_dir), "audit_dir": str(run_dir / "student"), "best": summary["best"],
           "selected_epoch": summary["selected_epoch"], "epochs": key["epochs"],
           "budget_epochs": key["epochs"] + key["init_epochs"], "init": cfg.student_init,
           "method_options": training["options"]["method"],
           "clean": block_summary(results, "clean"), "pgd": block_summary(results, "pgd"),
           "class_state": class_state_summary(training),
           "fawa_updates": sum(r.get("fawa_updated") in ("1", "True") for r in metrics) if arm == "cfa" else None,
           "val_curve": [{"epoch": int(r["epoch"]), "val_robust_avg": r.get("val_robust_avg"),
                          "val_robust_worst": r.get("val_robust_worst")} for r in metrics]}
    if frl:
        run["seconds_with_init"] = round(seconds + sat["seconds"], 1)
    write_json(run_dir / SUMMARY, run)
    return run


def finished_run(args, arm: str, seed: int, teacher_file, data, out_root: Path):
    """The summary of a finished run on disk (made under this configuration), or None."""
    key = run_key(args, arm, seed, teacher_file, len(data["train"].y), len(data["test"].y))
    return read_summary(out_root / f"{arm}_s{seed}" / SUMMARY, key)


def claim_holder(run_dir: Path):
    """The live process id holding run_dir's claim, or None (no claim, or its holder has died)."""
    try:
        pid = int((run_dir / CLAIM).read_text() or -1)
    except FileNotFoundError:
        return None
    except ValueError:
        return -1   # being written this instant: held
    if pid < 0:
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def claim(run_dir: Path) -> bool:
    """--worker: take run_dir unless another live worker holds it (a claim file with its pid)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = claim_holder(run_dir)
    if holder == os.getpid():
        return True
    if holder is not None:
        return False
    (run_dir / CLAIM).unlink(missing_ok=True)   # a dead worker's claim
    try:
        fd = os.open(run_dir / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False   # another worker took it between the check and here
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def train_all(args, order, teacher, teacher_file, data, step_size, out_root, command, payload, save, deadline):
    """Train every (seed, arm) of `order` that is not finished. With --worker several processes share
    the list: each takes the runs no live worker holds; frl waits while its SAT init is in training."""
    pending = [] if args.tables_only else list(order)
    while pending:
        waiting = False
        for seed, arm in list(pending):
            run_dir = out_root / f"{arm}_s{seed}"
            done = args.resume and (run_dir / SUMMARY).is_file()
            if not done and past(deadline):
                payload["skipped"].append({"seed": seed, "arm": arm, "why": "deadline (training)"})
                print(f"skip {arm} seed {seed}: past the deadline", flush=True)
                pending.remove((seed, arm))
                continue
            if not done and args.worker and not claim(run_dir):
                pending.remove((seed, arm))   # another worker's: read back in the final pass
                continue
            if arm == "frl" and not done and finished_run(args, "sat", seed, teacher_file, data, out_root) is None:
                if claim_holder(out_root / f"sat_s{seed}") is not None:
                    waiting = True   # its SAT init is still training in another worker
                    continue
            run = train_arm(args, arm, seed, teacher, teacher_file, data, step_size, out_root, command)
            pending.remove((seed, arm))
            if run is None:
                payload["skipped"].append({"seed": seed, "arm": arm, "why": "no SAT student of this seed"})
                continue
            (run_dir / CLAIM).unlink(missing_ok=True)
            print(f"{arm:10s} seed {seed}: {run['seconds']:6.0f} s{' (cached)' if done else ''}, selected epoch "
                  f"{run['selected_epoch']}, clean {common.pct(run['clean']['avg'])}, PGD-20 "
                  f"{common.pct(run['pgd']['avg'])} worst {common.pct(run['pgd']['worst'])} "
                  f"({run['pgd']['worst_class']}) NSD {fmt_nsd(run['pgd']['nsd'])}", flush=True)
        if waiting and pending:
            time.sleep(15)
    # Every finished run of the study, whoever trained it.
    payload["runs"] = [r for r in (finished_run(args, a, s, teacher_file, data, out_root) for s, a in order) if r]
    save()


def audit_aa(args, run: dict, aa_test, command: str) -> dict:
    from robaudit.audit.engine import ScanConfig
    from robaudit.audit.scan_outputs import scan_and_report
    from robaudit.audit.models.loading import load_model

    path = Path(run["dir"]) / AA_SUMMARY
    key = {"best": run["best"], "aa_images": len(aa_test.y)}
    saved = read_summary(path, key) if args.resume else None
    if saved is not None:
        return saved
    t0 = time.perf_counter()
    model = load_model(run["best"], arch=args.student, num_classes=len(aa_test.classes), device=args.device,
                       input_shape=tuple(aa_test.x.shape[1:]))
    res = scan_and_report(ScanConfig(out_dir=Path(run["dir"]) / "aa_audit", attacks=["clean", "pgd", "aa"],
                              seed=run["seed"], device=args.device,
                              command=f"{command} (AA audit, {run['arm']}, seed {run['seed']})"),
                   model=model, data=aa_test)
    aa = {"key": key, "aa": block_summary(res, "aa"), "pgd": block_summary(res, "pgd"),
          "clean": block_summary(res, "clean"), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(path, aa)
    return aa


def load_data(args, path):
    from robaudit.audit.data.datasets import load_dataset

    train = load_dataset(str(path), split="train", n_per_class=args.n_per_class)
    teacher_train = (train if args.quick else
                     load_dataset(str(path), split="train", n_per_class=args.teacher_n_per_class))
    return {"train": train, "teacher_train": teacher_train,
            "test": load_dataset(str(path), split="test", limit=args.test_limit),
            "aa_test": load_dataset(str(path), split="test", n_per_class=args.audit_n_per_class)}


def main(argv=None) -> None:
    args = parse_args(argv)
    from robaudit.audit.engine import parse_eps
    from robaudit.audit.models.loading import load_model
    from robaudit.remediate.train import scale_milestones

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    deadline = parse_deadline(args.deadline)
    aa_deadline = parse_deadline(args.aa_deadline) or deadline
    aa_seeds = {int(v) for v in args.aa_seeds.split(",") if v.strip()}
    step_size = parse_eps(args.step_size)
    tag = "reproduce_absld_quick" if args.quick else "reproduce_absld"
    out_root = Path(args.out) if args.out else common.RESULTS_DIR / tag
    if args.out:  # results json named after the run folder, so two studies never overwrite one another
        tag = out_root.name
    if args.worker:
        tag = f"{tag}_{args.worker}"
    path = common.data_path(args.data)
    info = common.machine()
    print(common.machine_line(info), flush=True)
    command = "benchmarks/reproduce_absld.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = load_data(args, path)
    print(f"teacher train {len(data['teacher_train'].y)} images, students' train {len(data['train'].y)} "
          f"({args.val_per_class}/class held out), test {len(data['test'].y)}, AA subset {len(data['aa_test'].y)}; "
          f"milestones {scale_milestones(args.epochs)} of {args.epochs} epochs; arms {args.arms}", flush=True)
    if out_root.exists() and not args.resume:
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "data": str(path), "args": vars(args), "command": command,
               "train_images": len(data["train"].y), "teacher_train_images": len(data["teacher_train"].y),
               "test_images": len(data["test"].y), "aa_images": len(data["aa_test"].y),
               "milestones": list(scale_milestones(args.epochs)), "teacher": None, "runs": [], "skipped": [],
               "started": now_utc().isoformat()}
    save = lambda: common.write_result(tag, payload)   # noqa: E731

    teacher_info = train_teacher(args, out_root, data, step_size, command)
    payload["teacher"] = teacher_info
    save()
    if teacher_info.get("pgd"):
        print(f"teacher: clean {common.pct(teacher_info['clean']['avg'])}, PGD-20 "
              f"{common.pct(teacher_info['pgd']['avg'])} worst {common.pct(teacher_info['pgd']['worst'])} "
              f"NSD {fmt_nsd(teacher_info['pgd']['nsd'])}", flush=True)
    if args.teacher_only:
        return
    teacher_file = Path(teacher_info["file"])
    teacher = load_model(str(teacher_file), arch=args.teacher_arch, num_classes=len(data["test"].classes),
                         device=args.device, input_shape=tuple(data["test"].x.shape[1:]))

    # Seeds outer, arms inner (absld-sb last of all: it is the optional arm), so a deadline
    # leaves complete seeds of the core comparison.
    order = [(s, a) for s in seeds for a in args.arms if a != "absld-sb"]
    order += [(s, "absld-sb") for s in seeds if "absld-sb" in args.arms]
    train_all(args, order, teacher, teacher_file, data, step_size, out_root, command, payload, save, deadline)

    if not args.no_aa:
        for run in payload["runs"]:
            if run["seed"] not in aa_seeds:
                continue
            if not (Path(run["dir"]) / AA_SUMMARY).is_file() and past(aa_deadline):
                payload["skipped"].append({"seed": run["seed"], "arm": run["arm"], "why": "deadline (AA)"})
                continue
            run["aa"] = audit_aa(args, run, data["aa_test"], command)
            save()
            print(f"AA {run['arm']:10s} seed {run['seed']}: {run['aa']['seconds']:5.0f} s: AA "
                  f"{common.pct(run['aa']['aa']['avg'])} worst {common.pct(run['aa']['aa']['worst'])} "
                  f"(PGD-20 on the same images {common.pct(run['aa']['pgd']['avg'])})", flush=True)

    payload["reports"] = rs.comparison_reports(payload["runs"], out_root / "compare")
    text, stats = rs.study_tables(payload, args, list(data["test"].classes))
    payload.update(stats)
    payload["table_md"] = text
    payload["finished"] = now_utc().isoformat()
    print("\n" + text, flush=True)
    (out_root / "table.md").write_text(text + "\n")
    result_path = save()
    print(f"\nruns in {out_root}; results in {result_path}", flush=True)


if __name__ == "__main__":
    main()
