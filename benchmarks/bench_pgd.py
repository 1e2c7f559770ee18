"""PGD-20 and CW-30 through robaudit's attacks vs a plain loop and torchattacks.

    python benchmarks/bench_pgd.py            # first 512 test images, 3 repeats, ~5 min on 2 idle CPU cores
    python benchmarks/bench_pgd.py --quick    # 64 images, 1 repeat, < 1 min

On the same model, images and batches (default 256; the last batch is smaller):

- robaudit any:   create_attack("pgd"|"cw", iterates="any") - the scan default: worst
                  over iterates, fooled points leave the batch (early stop).
- robaudit final: iterates="final" - every attacked point takes every step, only the
                  last iterate is scored (the papers' evaluators).
- plain loop:     the authors' style, written here: uniform start from the global torch
                  RNG (torch.manual_seed(seed)), `steps` sign steps of 2/255 on the batch-
                  mean loss, every image attacked, final iterate scored, no early stop.
- plain loop, robaudit start: the same loop from robaudit's per-sample start - its final
                  flags must equal robaudit final's exactly (same arithmetic).
- torchattacks PGD(eps=8/255, alpha=2/255, steps=20, random_start=True) if installed
                  (torchattacks has no CW-inf: its CW is the L2 attack).

Robust = clean-correct and the scored iterate(s) still correct, for every row (the
plain loop's accuracy on its adversarial images alone, the authors' number, is in
the JSON as adv_only_acc). robaudit attacks only clean-correct points.

Efficiency = time of `steps` raw forward+backward passes (cross-entropy, input
gradient, parameters frozen, eval mode) on the same full batches / attack time.
"overhead efficiency" uses raw passes on the clean-correct points only (what
robaudit's final-iterate attack actually computes), so it isolates the loop's own
cost; 1.0 = no overhead. Timings are medians over --repeats, methods interleaved.

Prints a table; writes benchmarks/_results/bench_pgd.json.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

import common

STEP = 2 / 255


def cw_margin(logits, y, kappa: float = 50.0):
    from robaudit.audit.attacks.cw import cw_margin_loss

    return cw_margin_loss(logits, y, kappa)


def plain_loop(module, x, y, *, steps: int, loss_name: str, start=None):
    """The authors' evaluation loop: no early stop, final iterate, batch-mean loss."""
    eps = common.EPS
    if start is None:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    else:
        x_adv = start.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            logits = module(x_adv)
            loss = F.cross_entropy(logits, y) if loss_name == "ce" else cw_margin(logits, y).mean()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + STEP * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        return module(x_adv).argmax(1)


def raw_passes(module, x, y, k: int) -> None:
    for _ in range(k):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(module(xr), y)
            torch.autograd.grad(loss, xr)


class Frozen:
    """Eval mode and parameters frozen for the benchmark's own loops (as robaudit's attacks do)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        for p in self.params:
            p.requires_grad_(False)
        self.module.eval()
        return self

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="first N test images (0: all 1017)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 images, 1 repeat (smoke test)")
    common.add_model_benchmark_options(parser)
    args = parser.parse_args()

    from robaudit.audit.attacks import create_attack

    path = common.data_path(args.data)
    root = common.models_dir(args.models_dir, args.quick)
    n = 64 if args.quick else (args.n or None)
    repeats = 1 if args.quick else args.repeats
    common.set_threads(args.threads)
    info = common.machine()
    print(common.machine_line(info), flush=True)
    data = common.load_split(path, "test", limit=n)
    n = len(data.y)
    torchattacks = None
    if not args.no_torchattacks:
        try:
            import torchattacks
        except ImportError:
            print("torchattacks is not installed: its rows are skipped")

    records: List[dict] = []
    rows: List[list] = []
    for name in [m for m in args.models.split(",") if m]:
        loaded = common.load(name, "pt2", root)
        module = loaded.module
        batches = []
        with torch.no_grad():
            for s in range(0, n, args.batch_size):
                xb, yb, ib = (data.x[s:s + args.batch_size].contiguous(), data.y[s:s + args.batch_size],
                              data.index[s:s + args.batch_size])
                batches.append((xb, yb, ib, module(xb).argmax(1)))
        clean = torch.cat([b[3] == b[1] for b in batches])
        for attack_name, steps, loss_name in (("pgd", 20, "ce"), ("cw", 30, "cw")):
            any_attack = create_attack(attack_name, eps=common.EPS, seed=args.seed, iterates="any")
            final_attack = create_attack(attack_name, eps=common.EPS, seed=args.seed, iterates="final")

            def run_robaudit(attack):
                return torch.cat([attack(module, xb, yb, ib, cp).robust for xb, yb, ib, cp in batches])

            def run_plain(robaudit_start: bool):
                torch.manual_seed(args.seed)
                out = []
                with Frozen(module):
                    for xb, yb, ib, cp in batches:
                        start = final_attack.start(xb, ib) if robaudit_start else None
                        out.append(plain_loop(module, xb, yb, steps=steps, loss_name=loss_name, start=start))
                return torch.cat(out)

            def run_torchattacks():
                torch.manual_seed(args.seed)
                attack = torchattacks.PGD(module, eps=common.EPS, alpha=STEP, steps=steps, random_start=True)
                attack.set_device("cpu")
                out = []
                for xb, yb, ib, cp in batches:
                    x_adv = attack(xb, yb)
                    with torch.no_grad():
                        out.append(module(x_adv).argmax(1))
                return torch.cat(out)

            def run_raw(correct_only: bool):
                with Frozen(module):
                    for xb, yb, ib, cp in batches:
                        keep = cp == yb if correct_only else slice(None)
                        raw_passes(module, xb[keep], yb[keep], steps)

            methods: Dict[str, Callable] = {
                "raw": lambda: run_raw(False),
                "raw_correct_only": lambda: run_raw(True),
                "robaudit_any": lambda: run_robaudit(any_attack),
                "robaudit_final": lambda: run_robaudit(final_attack),
                "plain_loop": lambda: run_plain(False),
                "plain_loop_robaudit_start": lambda: run_plain(True),
            }
            if torchattacks is not None and attack_name == "pgd":
                methods["torchattacks"] = run_torchattacks
            times: Dict[str, List[float]] = {k: [] for k in methods}
            outputs: Dict[str, torch.Tensor] = {}
            saved_rng = torch.get_rng_state()
            for _ in range(repeats):
                for key, fn in methods.items():
                    out, t = common.timed(fn)
                    times[key].append(t[0])
                    outputs[key] = out
            torch.set_rng_state(saved_rng)
            med = {k: common.median(v) for k, v in times.items()}

            robust: Dict[str, np.ndarray] = {}
            adv_only: Dict[str, float] = {}
            for key in ("robaudit_any", "robaudit_final"):
                robust[key] = outputs[key].numpy()
            for key in ("plain_loop", "plain_loop_robaudit_start", "torchattacks"):
                if key in outputs:
                    correct_adv = (outputs[key] == data.y)
                    adv_only[key] = float(correct_adv.float().mean())
                    robust[key] = (correct_adv & clean).numpy()
            checks = {
                "any_le_final_per_sample": bool((~robust["robaudit_any"] | robust["robaudit_final"]).all()),
                "final_equals_plain_loop_same_start": float(
                    (robust["robaudit_final"] == robust["plain_loop_robaudit_start"]).mean()),
                "any_le_plain_loop": bool(robust["robaudit_any"].mean() <= robust["plain_loop"].mean()),
            }
            label = f"{'PGD-20' if attack_name == 'pgd' else 'CW-30'}"
            rec = {"model": name, "attack": label, "n": n, "n_clean_correct": int(clean.sum()),
                   "batch_size": args.batch_size, "repeats": repeats, "times_s": times, "median_s": med,
                   "robust_acc": {k: float(v.mean()) for k, v in robust.items()}, "adv_only_acc": adv_only,
                   "efficiency": {k: med["raw"] / med[k] for k in med if not k.startswith("raw")},
                   "overhead_efficiency_final": med["raw_correct_only"] / med["robaudit_final"],
                   "early_stop_speedup": med["robaudit_final"] / med["robaudit_any"],
                   "checks": checks}
            records.append(rec)
            for key, title in (("robaudit_any", "robaudit (any, early stop)"),
                               ("robaudit_final", "robaudit (final iterate)"),
                               ("plain_loop", "plain loop"),
                               ("plain_loop_robaudit_start", "plain loop, robaudit start"),
                               ("torchattacks", "torchattacks PGD")):
                if key not in med:
                    continue
                extra = ""
                if key == "robaudit_final":
                    extra = f"overhead eff {rec['overhead_efficiency_final']:.2f}"
                elif key == "plain_loop_robaudit_start":
                    extra = f"flags = robaudit final: {common.pct(checks['final_equals_plain_loop_same_start'])}"
                elif key == "robaudit_any":
                    extra = f"early stop x{rec['early_stop_speedup']:.2f} faster"
                rows.append([name, label, title, common.pct(rec["robust_acc"][key]), f"{med[key]:.2f}",
                             f"{rec['efficiency'][key]:.2f}", extra])
            rows.append([name, label, f"{steps} raw fwd+bwd (all {n})", "", f"{med['raw']:.2f}", "1.00",
                         f"clean-correct only: {med['raw_correct_only']:.2f}s"])
            print(f"  {name} {label}: done", flush=True)

    print(f"\nLinf eps 8/255, step 2/255, first {n} test images, batches of {args.batch_size}, CPU; "
          f"median of {repeats}")
    print(common.table(["model", "attack", "implementation", "robust acc", "seconds", "efficiency", "note"], rows))
    print("efficiency = time of the raw forward+backward passes on the same full batches / attack time "
          "(> 1: faster than the raw passes, from skipping clean-wrong and fooled points)")
    for rec in records:
        c = rec["checks"]
        if not c["any_le_final_per_sample"] or c["final_equals_plain_loop_same_start"] < 1:
            print(f"WARNING {rec['model']} {rec['attack']}: {c}")
    out = common.write_result("bench_pgd_quick" if args.quick else "bench_pgd",
                              {"machine": info, "data": str(path), "models_dir": str(root), "n": n,
                               "seed": args.seed, "eps": common.EPS, "records": records})
    print(f"results in {out}")


if __name__ == "__main__":
    main()
