"""AutoAttack through robaudit's engine vs pyautoattack called directly.

    python benchmarks/bench_autoattack.py            # N = 200 test images, ~5 min on 2 idle CPU cores
    python benchmarks/bench_autoattack.py --threads 1 --n 100   # on a loaded machine (~6 min)
    python benchmarks/bench_autoattack.py --quick    # N = 16, reduced AA budget, ~20 s

On the same model and the same first N test images of the CIFAR-10 subset, each
in ONE batch (pyautoattack seeds per run, so its results depend on which points
share a batch; one batch makes the compositions equal):

- robaudit: `run_scan(ScanConfig(attacks=["clean", "aa"], batch_size=N))` - what
  `robaudit scan --attacks clean,aa --batch-size N` runs; AA standard, eps 8/255,
  seed 0. Times: the whole scan (clean pass, model checks, AA, writing
  results.json/samples.npz) and AA alone (results["attacks"]["aa"]["seconds"]).
- reference: `pyautoattack.AutoAttack(model, norm="Linf", eps=8/255,
  version="standard", seed=0).run_standard_evaluation(x, y, batch_size=N)` on the
  very same module object; robust = its returned label equals y.
- agreement: the fraction of the N images whose robust flag is the same in both.
- natural and adversarial model (.pt2); the adversarial model's ONNX and
  TorchScript forms through robaudit too, compared with its .pt2 flags.
- torchattacks.AutoAttack (version="standard", its default 10 APGD/FAB steps
  instead of 100) when torchattacks is installed: how much weaker it is.

Prints a table; writes benchmarks/_results/bench_autoattack.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import common


STANDARD_ITER, STANDARD_QUERIES = 100, 5000


def robaudit_aa(loaded, data, seed: int, n_iter: int, n_queries: int) -> dict:
    from robaudit.audit.engine import ScanConfig, run_scan

    overrides = {}
    if (n_iter, n_queries) != (STANDARD_ITER, STANDARD_QUERIES):
        overrides = {"aa": {"n_iter": n_iter, "n_queries": n_queries}}
    with tempfile.TemporaryDirectory(prefix="bench-aa-") as tmp:
        cfg = ScanConfig(out_dir=Path(tmp), attacks=["clean", "aa"], eps=common.EPS, seed=seed,
                         batch_size=len(data.y), device="cpu", write_report=False,
                         attack_overrides=overrides)
        results, times = common.timed(lambda: run_scan(cfg, model=loaded, data=data))
        with np.load(Path(tmp) / "samples.npz") as f:
            robust = f["robust_aa"].astype(bool)
            clean = f["clean_pred"] == f["y"]
    return {"robust": robust, "clean_correct": clean, "wall_s": times[0],
            "aa_s": float(results["attacks"]["aa"]["seconds"]),
            "checks": [c.get("id") for c in results["checks"]]}


def set_budget(adversary, n_iter: int, n_queries: int) -> None:
    """Reduced budgets (--quick only), set as pyautoattack's constructors derive them."""
    from robaudit.audit.attacks.autoattack import set_apgd_iterations

    for apgd in (adversary.apgd, adversary.apgd_targeted):
        set_apgd_iterations(apgd, n_iter)
    adversary.fab.n_iter = n_iter
    adversary.square.n_queries = n_queries


def reference_aa(module, data, seed: int, n_iter: int, n_queries: int) -> dict:
    from pyautoattack import AutoAttack

    def run():
        adversary = AutoAttack(module, norm="Linf", eps=common.EPS, version="standard", seed=seed,
                               device="cpu")
        adversary.verbose = False
        if (n_iter, n_queries) != (STANDARD_ITER, STANDARD_QUERIES):
            set_budget(adversary, n_iter, n_queries)
        return adversary.run_standard_evaluation(data.x, data.y, batch_size=len(data.y))

    (x_adv, y_adv), times = common.timed(run)
    assert (x_adv - data.x).abs().max() <= common.EPS + 1e-6
    return {"robust": (y_adv == data.y).numpy(), "wall_s": times[0]}


def torchattacks_aa(module, data, seed: int, n_queries: int):
    try:
        import torchattacks
    except ImportError:
        return None
    saved = torch.get_rng_state()

    def run():
        attack = torchattacks.AutoAttack(module, norm="Linf", eps=common.EPS, version="standard",
                                         n_classes=10, seed=seed)
        attack.set_device("cpu")
        attack._autoattack.attacks[-1].n_queries = n_queries   # Square; 5000 unless --quick
        x_adv = attack(data.x, data.y)
        with torch.no_grad():
            return module(x_adv).argmax(1), module(data.x).argmax(1)

    try:
        (adv_pred, clean_pred), times = common.timed(run)
    finally:
        torch.set_rng_state(saved)
    robust = ((adv_pred == data.y) & (clean_pred == data.y)).numpy()
    return {"robust": robust, "wall_s": times[0], "version": torchattacks.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="first N test images, one AA batch")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: N = 16 and a reduced AA budget (10 iterations, 100 Square "
                             "queries) on both sides")
    parser.add_argument("--forms", default="onnx,torchscript",
                        help="extra forms of the adversarial model to scan through robaudit ('' for none)")
    common.add_model_benchmark_options(parser)
    args = parser.parse_args()

    path = common.data_path(args.data)
    root = common.models_dir(args.models_dir, args.quick)
    n = 16 if args.quick else args.n
    n_iter, n_queries = (10, 100) if args.quick else (STANDARD_ITER, STANDARD_QUERIES)
    common.set_threads(args.threads)
    info = common.machine()
    print(common.machine_line(info))
    data = common.load_split(path, "test", limit=n)
    names = [m for m in args.models.split(",") if m]
    forms = [f for f in args.forms.split(",") if f]

    records, rows = [], []
    for name in names:
        loaded = common.load(name, "pt2", root)
        warm = data.x[:8].clone().requires_grad_(True)   # warm-up: neither side pays first-call costs
        torch.autograd.grad(loaded.module(warm).sum(), warm)
        ours = robaudit_aa(loaded, data, args.seed, n_iter, n_queries)
        ref = reference_aa(loaded.module, data, args.seed, n_iter, n_queries)
        agree = float((ours["robust"] == ref["robust"]).mean())
        differing = np.flatnonzero(ours["robust"] != ref["robust"]).tolist()
        rec = {"model": name, "form": "pt2", "n": n, "clean_acc": float(ours["clean_correct"].mean()),
               "robaudit_robust_acc": float(ours["robust"].mean()), "reference_robust_acc": float(ref["robust"].mean()),
               "agreement": agree, "differing_positions": differing,
               "robaudit_wall_s": round(ours["wall_s"], 2), "robaudit_aa_s": round(ours["aa_s"], 2),
               "reference_wall_s": round(ref["wall_s"], 2),
               "ratio_wall": round(ours["wall_s"] / ref["wall_s"], 3),
               "ratio_aa_only": round(ours["aa_s"] / ref["wall_s"], 3), "checks": ours["checks"]}
        records.append(rec)
        rows.append([name, "pt2", common.pct(rec["clean_acc"]), common.pct(rec["robaudit_robust_acc"]),
                     common.pct(rec["reference_robust_acc"]), common.pct(agree), f"{ours['wall_s']:.1f}",
                     f"{ours['aa_s']:.1f}", f"{ref['wall_s']:.1f}", f"{rec['ratio_wall']:.2f}"])
        print(f"  {name}: done ({ours['wall_s']:.0f}s + {ref['wall_s']:.0f}s)", flush=True)

        if name == "adversarial":
            for form in forms:
                other = common.load(name, form, root)
                res = robaudit_aa(other, data, args.seed, n_iter, n_queries)
                same = float((res["robust"] == ours["robust"]).mean())
                records.append({"model": name, "form": form, "n": n, "clean_acc": float(res["clean_correct"].mean()),
                                "robaudit_robust_acc": float(res["robust"].mean()),
                                "agreement_with_pt2": same,
                                "agreement_with_reference": float((res["robust"] == ref["robust"]).mean()),
                                "differing_positions_vs_pt2": np.flatnonzero(res["robust"] != ours["robust"]).tolist(),
                                "white_box": other.white_box, "robaudit_wall_s": round(res["wall_s"], 2),
                                "robaudit_aa_s": round(res["aa_s"], 2)})
                rows.append([name, f"{form} (vs pt2)", common.pct(records[-1]["clean_acc"]),
                             common.pct(records[-1]["robaudit_robust_acc"]), "", common.pct(same),
                             f"{res['wall_s']:.1f}", f"{res['aa_s']:.1f}", "", ""])
                print(f"  {name}/{form}: done ({res['wall_s']:.0f}s)", flush=True)

        if not args.no_torchattacks:
            ta = torchattacks_aa(loaded.module, data, args.seed, n_queries)
            if ta is None:
                print("  torchattacks is not installed: its AutoAttack row is skipped")
            else:
                records.append({"model": name, "form": "pt2", "attack": f"torchattacks {ta['version']} AutoAttack",
                                "robust_acc": float(ta["robust"].mean()),
                                "agreement_with_reference": float((ta["robust"] == ref["robust"]).mean()),
                                "weaker_by_points": float(ta["robust"].mean() - ref["robust"].mean()),
                                "missed_by_torchattacks": int((ta["robust"] & ~ref["robust"]).sum()),
                                "wall_s": round(ta["wall_s"], 2)})
                rows.append([name, "torchattacks AA (10 it.)", "", common.pct(float(ta["robust"].mean())),
                             common.pct(rec["reference_robust_acc"]),
                             common.pct(records[-1]["agreement_with_reference"]), f"{ta['wall_s']:.1f}", "",
                             f"{ref['wall_s']:.1f}", f"{ta['wall_s'] / ref['wall_s']:.2f}"])

    budget = ("" if not args.quick else
              f" - QUICK: reduced budget {n_iter} iterations / {n_queries} queries, not the standard AA")
    print(f"\nAutoAttack standard, Linf eps 8/255, seed {args.seed}, first {n} test images in one batch, "
          f"CPU{budget}")
    print(common.table(["model", "form / tool", "clean", "robust (robaudit/tool)", "robust (reference)",
                        "agreement", "tool s", "AA-only s", "reference s", "time ratio"], rows))
    print("agreement = same per-sample robust flag; time ratio = tool wall time / direct pyautoattack "
          "wall time (robaudit: whole run_scan, incl. clean pass, model checks and file writes)")
    out = common.write_result("bench_autoattack_quick" if args.quick else "bench_autoattack",
                              {"machine": info, "data": str(path), "models_dir": str(root), "n": n,
                               "seed": args.seed, "eps": common.EPS, "n_iter": n_iter, "n_queries": n_queries,
                               "records": records})
    print(f"results in {out}")


if __name__ == "__main__":
    main()
