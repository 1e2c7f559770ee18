"""Train the two benchmark models with robaudit itself, and export each in three forms.

    python benchmarks/train_models.py            # 14 min at load 4.7 on 2 CPU cores (~7 idle)
    python benchmarks/train_models.py --quick    # tiny smoke-test models, ~15 s

Both are `robaudit.remediate.run_remediate(method="sat", teacher=None)` runs on the
training images of ../shared/data/cifar10_subset.npz (5085; 20 per class held out
for checkpoint selection), SmallCNN (~61k parameters), SGD lr 0.1 momentum 0.9 wd
2e-4, batch 128, crop+flip augmentation, lr /10 at the paper's milestones scaled
to the epoch count:

- natural:     SAT with eps = 0 and 0 inner steps, i.e. plain cross-entropy
               training on clean images (robaudit has no separate clean-training
               method; eps 0 / steps 0 makes SAT exactly that).
- adversarial: SAT (PGD-AT, Madry et al.) at eps 8/255, PGD-5 inner attack with
               step 2/255 (the reference uses PGD-10; 5 steps halves the CPU cost).

run_remediate exports the selected weights as student.pt2 (torch.export),
student.torchscript.pt and student.onnx into benchmarks/_models/<name>/ (with
--quick: benchmarks/_models/quick/<name>/). The script then loads every form
through robaudit.audit.models.loading.load_model and prints clean test accuracy and the
largest logit difference of each form against the .pt2 one.
The equivalent CLI run of the adversarial model would be
    robaudit remediate --method sat --student smallcnn --dataset ../shared/data/cifar10_subset.npz \
        --epochs 8 --steps 5 --val-per-class 20 --audit-attacks clean --out benchmarks/_models/adversarial
(the script uses the Python API to also set the selection attack's steps).
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch

import common


def train_one(name: str, *, out_root, train, eps: float, steps: int, epochs: int, seed: int,
              limit_note: str) -> dict:
    from robaudit.remediate.train import RemediateConfig, run_remediate

    out_dir = out_root / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg = RemediateConfig(out_dir=out_dir, method="sat", student="smallcnn", epochs=epochs, eps=eps,
                          steps=steps, step_size=2 / 255, val_per_class=20,
                          val_steps=10 if steps else 0, seed=seed, device="cpu", progress=False,
                          command=f"benchmarks/train_models.py ({name}{limit_note})")
    t0 = time.perf_counter()
    summary = run_remediate(cfg, teacher=None, train_data=train, test_data=None)
    seconds = time.perf_counter() - t0
    failed = {fmt: e["error"] for fmt, e in summary["exports"].items() if not e["ok"]}
    if failed:
        common.die(f"{name}: export failed: {failed}")
    curves = summary["training"]["curves"]
    return {"name": name, "eps": eps, "inner_steps": steps, "epochs": epochs, "seconds": round(seconds, 1),
            "selected_epoch": summary["selected_epoch"], "curves": curves,
            "val_clean": curves[summary["selected_epoch"] - 1]["val_clean_avg"],
            "val_robust_pgd10": curves[summary["selected_epoch"] - 1]["val_robust_avg"] if steps else None,
            "exports": {fmt: e["path"] for fmt, e in summary["exports"].items()}}


def check_forms(name: str, out_root, test) -> dict:
    """Clean accuracy of each exported form and max |logit - logit(.pt2)| on the test split."""
    out = {}
    reference = None
    for form in common.FORMS:
        loaded = common.load(name, form, out_root)
        with torch.no_grad():
            logits = torch.cat([loaded.module(test.x[i:i + 256]) for i in range(0, len(test.y), 256)])
        if reference is None:
            reference = logits
        out[form] = {"clean_acc": float((logits.argmax(1) == test.y).float().mean()),
                     "max_abs_logit_diff_vs_pt2": float((logits - reference).abs().max()),
                     "same_argmax_as_pt2": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
                     "white_box": loaded.white_box, "format": loaded.format}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="the CIFAR-10 subset .npz (default ../shared/data/...)")
    parser.add_argument("--quick", action="store_true", help="tiny models (1 epoch on 600 images) for a smoke test")
    parser.add_argument("--natural-epochs", type=int, default=20)
    parser.add_argument("--adversarial-epochs", type=int, default=8)
    parser.add_argument("--adversarial-steps", type=int, default=5, help="inner PGD steps of SAT")
    parser.add_argument("--seed", type=int, default=0)
    common.add_threads_option(parser)
    parser.add_argument("--models-dir", default=None, help="default benchmarks/_models (quick: _models/quick)")
    args = parser.parse_args()

    path = common.data_path(args.data)
    common.set_threads(args.threads)
    info = common.machine()
    print(common.machine_line(info))
    out_root = (common.Path(args.models_dir) if args.models_dir else
                common.QUICK_MODELS_DIR if args.quick else common.MODELS_DIR)
    limit = 600 if args.quick else None
    train = common.load_split(path, "train")
    if limit:
        from robaudit.audit.data.datasets import load_dataset

        train = load_dataset(str(path), split="train", n_per_class=limit // 10)
    test = common.load_split(path, "test")
    nat_epochs = 1 if args.quick else args.natural_epochs
    adv_epochs = 1 if args.quick else args.adversarial_epochs
    adv_steps = 2 if args.quick else args.adversarial_steps
    note = f", quick: {len(train.y)} train images" if args.quick else ""

    trained = [train_one("natural", out_root=out_root, train=train, eps=0.0, steps=0, epochs=nat_epochs,
                         seed=args.seed, limit_note=note),
               train_one("adversarial", out_root=out_root, train=train, eps=common.EPS, steps=adv_steps,
                         epochs=adv_epochs, seed=args.seed, limit_note=note)]
    rows, forms = [], {}
    for entry in trained:
        forms[entry["name"]] = check_forms(entry["name"], out_root, test)
        for form, f in forms[entry["name"]].items():
            rows.append([entry["name"], form, entry["epochs"] if form == "pt2" else "",
                         f"{entry['seconds']:.0f}" if form == "pt2" else "",
                         common.pct(f["clean_acc"]), f"{f['max_abs_logit_diff_vs_pt2']:.2e}",
                         common.pct(f["same_argmax_as_pt2"], 2)])
    print(f"\nSmallCNN, SAT via run_remediate on {len(train.y)} train images "
          f"(20/class held out); test = {len(test.y)} images")
    print(common.table(["model", "form", "epochs", "train s", "clean test acc", "max|dlogit| vs pt2",
                        "same argmax"], rows))
    for entry in trained:
        if entry["val_robust_pgd10"] is not None:
            print(f"{entry['name']}: selected epoch {entry['selected_epoch']}, val clean "
                  f"{common.pct(entry['val_clean'])}, val PGD-10 {common.pct(entry['val_robust_pgd10'])}")
        else:
            print(f"{entry['name']}: selected epoch {entry['selected_epoch']}, val clean {common.pct(entry['val_clean'])}")
    result = common.write_result("train_models_quick" if args.quick else "train_models",
                                 {"machine": info, "data": str(path), "models_dir": str(out_root),
                                  "models": trained, "forms": forms, "quick": args.quick})
    print(f"\nmodels in {out_root}; results in {result}")


if __name__ == "__main__":
    main()
