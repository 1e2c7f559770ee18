"""One FMN run for a whole robustness curve vs PGD-20 at one eps and at 10 eps values.

    OMP_NUM_THREADS=1 python benchmarks/bench_fmn.py --threads 1            # ~200 test images
    python benchmarks/bench_fmn.py --images 64 --epochs 1                   # smoke run

The model: benchmarks/_models/adversarial (benchmarks/train_models.py) when it exists, else a
smallcnn trained here for --epochs natural epochs on the subset's training split (timed apart;
a natural model breaks at small eps, hence the default --eps 1/255 for it). All in one process,
on the same first --images test images, one batch:

- fmn:      create_attack("fmn", eps, steps=--fmn-steps): every point's minimal L-inf norm,
            hence the curve at every eps up to cap = 4 * eps;
- pgd@eps:  PGD-20 at the audited eps (the scan default: any-iterate, early stop);
- pgd@10:   PGD-20 at 10 eps values, cap * k / 10 for k = 1..10 - the other way to draw
            the same curve at 10 points.
Reported: seconds, ratios, and how close the curves are at the 10 eps values (max per-class
gap and overall gap, fmn curve minus PGD; > 0 where PGD is stronger). With adv-lib importable
(pip's adv-lib, or ADV_LIB_PATH=folder holding adv_lib/), its fmn is run on the clean-correct
points with the same hyper-parameters and the per-point norms compared with ours.

Prints a table; writes benchmarks/_results/bench_fmn.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from robaudit.audit.attacks import create_attack  # noqa: E402
from robaudit.audit.curves import robustness_curve  # noqa: E402
from robaudit.audit.engine import parse_eps  # noqa: E402


def quick_model(train, epochs: int, seed: int):
    """A smallcnn trained naturally on the training split (Adam, batch 128)."""
    from robaudit.audit.models.architectures import create_architecture

    torch.manual_seed(seed)
    model = create_architecture("smallcnn", num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train.y), generator=gen)
        for start in range(0, len(order), 128):
            take = order[start:start + 128]
            loss = F.cross_entropy(model(train.x[take]), train.y[take])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def adv_lib_fmn():
    """adv-lib's fmn function, loaded by file (its package __init__ imports visdom), or None."""
    root = os.environ.get("ADV_LIB_PATH")
    if root:
        sys.path.insert(0, root)
    spec = importlib.util.find_spec("adv_lib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "attacks" / "fast_minimum_norm.py"
    module_spec = importlib.util.spec_from_file_location("adv_lib_fmn", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.fmn


def class_accuracy(robust: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.bincount(y[robust], minlength=10) / np.maximum(np.bincount(y, minlength=10), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--eps", default=None, help="audited eps (default 8/255 for the trained "
                                                    "adversarial model, 1/255 for the quick natural one)")
    parser.add_argument("--fmn-steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the quick model")
    parser.add_argument("--data", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="an adversarially trained model file to use instead "
                                                      "(e.g. a reproduce_absld.py teacher's best.pt)")
    parser.add_argument("--arch", default="smallcnn", help="architecture of --model")
    common.add_threads_option(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    info = common.machine()
    path = common.data_path(args.data)
    test = common.load_split(path, "test", limit=args.images)
    trained = common.MODELS_DIR / "adversarial" / common.FORMS["pt2"]
    t0 = time.perf_counter()
    if args.model:
        from robaudit.audit.models.loading import load_model

        model = load_model(args.model, arch=args.arch, num_classes=10, device="cpu",
                           input_shape=tuple(test.x.shape[1:])).module
        model_name, default_eps = f"{args.arch} from {args.model} (adversarially trained)", "8/255"
    elif trained.is_file():
        model, model_name, default_eps = common.load("adversarial").module, "adversarial (train_models.py)", "8/255"
    else:
        model = quick_model(common.load_split(path, "train"), args.epochs, args.seed)
        model_name, default_eps = f"smallcnn, {args.epochs} natural epochs (trained here)", "1/255"
    train_seconds = time.perf_counter() - t0
    eps = parse_eps(args.eps or default_eps)
    x, y, index = test.x, test.y, test.index
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    y_np, right = y.numpy(), (clean_pred == y).numpy()

    def run(name, e, **kw):
        attack = create_attack(name, eps=e, seed=args.seed, **kw)
        t = time.perf_counter()
        result = attack(model, x, y, index, clean_pred)
        return result, time.perf_counter() - t, attack

    fmn, fmn_s, fmn_attack = run("fmn", eps, steps=args.fmn_steps)
    min_norm = fmn.extras["min_norm"].numpy()
    cap = fmn_attack.cap
    _, pgd_s, _ = run("pgd", eps)
    grid = [cap * k / 10 for k in range(1, 11)]
    pgd_curve, pgd10_s = [], 0.0
    for e in grid:
        result, seconds, _ = run("pgd", e)
        pgd10_s += seconds
        pgd_curve.append(class_accuracy(result.robust.numpy(), y_np))
    fmn_curve = [class_accuracy(right & (min_norm > e), y_np) for e in grid]
    gaps = np.array(fmn_curve) - np.array(pgd_curve)                   # [10 eps, 10 classes]
    counts = np.bincount(y_np, minlength=10)
    overall_gap = (gaps * counts).sum(axis=1) / counts.sum()
    block = robustness_curve(min_norm, y_np, test.classes, audited_eps=eps, cap=cap, norm="linf",
                             description=repr(fmn_attack), clean_pred=clean_pred.numpy())

    reference = {}
    ref_fmn = adv_lib_fmn()
    if ref_fmn is not None:
        take = torch.from_numpy(np.flatnonzero(right))
        t = time.perf_counter()
        ref_adv = ref_fmn(model, x[take], y[take], norm=float("inf"), steps=args.fmn_steps)
        ref_s = time.perf_counter() - t
        with torch.no_grad():
            ref_fooled = (model(ref_adv).argmax(1) != y[take]).numpy()
        ref_norm = np.where(ref_fooled, (ref_adv - x[take]).flatten(1).abs().amax(1).numpy(), np.inf)
        ours = min_norm[right]
        both = np.isfinite(ref_norm) & np.isfinite(ours)
        ratio = ours[both] / ref_norm[both]
        reference = {"seconds": ref_s, "fooled": int(ref_fooled.sum()), "ours_fooled": int(np.isfinite(ours).sum()),
                     "ratio_median": float(np.median(ratio)), "ratio_p10": float(np.percentile(ratio, 10)),
                     "ratio_p90": float(np.percentile(ratio, 90))}

    rows = [["fmn (whole curve)", f"{fmn_s:.1f}", "1.00"],
            ["pgd-20 @ audited eps", f"{pgd_s:.1f}", f"{pgd_s / fmn_s:.2f}"],
            ["pgd-20 @ 10 eps", f"{pgd10_s:.1f}", f"{pgd10_s / fmn_s:.2f}"]]
    print(common.machine_line(info))
    print(f"# model: {model_name} ({train_seconds:.0f} s to load/train); {len(y)} images, "
          f"clean acc {right.mean():.1%}; eps {eps * 255:.2g}/255, cap {cap * 255:.2g}/255, fmn steps {args.fmn_steps}")
    print(common.table(["run", "seconds", "x fmn"], rows))
    print(f"curve gap (fmn - pgd) at the 10 eps: max per-class {np.abs(gaps).max():.1%} "
          f"(signed extremes {gaps.min():+.1%} / {gaps.max():+.1%}), overall "
          f"{', '.join(f'{g:+.1%}' for g in overall_gap)}")
    print(f"fmn never fooled {sum(block['not_found'])} clean-correct points; median minimal norm per class "
          + ", ".join("-" if m is None else f"{m * 255:.2f}" for m in block["median_eps"]) + " (/255)")
    if reference:
        print(f"adv-lib fmn ({args.fmn_steps} steps): {reference['seconds']:.1f} s, fooled {reference['fooled']} "
              f"vs ours {reference['ours_fooled']}; our norm / adv-lib's: median {reference['ratio_median']:.4f}, "
              f"p10 {reference['ratio_p10']:.4f}, p90 {reference['ratio_p90']:.4f}")
    else:
        print("adv-lib not importable: no reference comparison (set ADV_LIB_PATH)")
    out = common.write_result("bench_fmn", {
        "machine": info, "model": model_name, "images": len(y), "eps": eps, "cap": cap,
        "fmn_steps": args.fmn_steps, "seconds": {"fmn": fmn_s, "pgd": pgd_s, "pgd10": pgd10_s},
        "grid": grid, "gaps": gaps.tolist(), "overall_gap": overall_gap.tolist(), "curve": block,
        "adv_lib": reference})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
