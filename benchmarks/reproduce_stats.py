"""Statistics of the ABSLD reproduction study (benchmarks/reproduce_absld.py): seeds are the unit.

Every arm trains once per seed, and one seed fixes the held-out split, the data order,
the augmentation and the attack starts for every arm, so arm A and arm B at the same seed
form a pair. Over the seeds this module gives, for A minus B on one metric:

- the mean paired difference and its 95 % Student-t interval (n - 1 degrees of freedom);
- the exact two-sided sign-flip (permutation) test: under "no difference" each paired
  difference is as likely to have either sign, so all 2^n sign patterns are enumerated and
  p = share of patterns whose |mean| is at least the observed one. With n seeds the smallest
  reachable p is 2 / 2^n (1/16 at 5 seeds): that bounds what n seeds can ever show.

`pooled_mcnemar` sums the discordant images of one class over the seeds and applies the
exact McNemar test to the totals. The same test images recur at every seed, so the pooled
pairs are not independent and that p-value is optimistic; the sign-flip test over seeds is
the one that respects the design.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

MAX_EXACT_SEEDS = 20   # 2^20 sign patterns: still instant; beyond that the enumeration would not be
TIE_TOLERANCE = 1e-12  # |mean| values equal up to float rounding count as "at least as extreme"


def mean_sd(values: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, sample SD with ddof 1 or None for one value, n) over the values that are not None."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None, None, 0
    if len(kept) == 1:
        return kept[0], None, 1
    return statistics.mean(kept), statistics.stdev(kept), len(kept)


def t_interval(diffs: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """Two-sided Student-t interval for the mean of `diffs` ((nan, nan) below two values)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2:
        return float("nan"), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean() - half), float(d.mean() + half)


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided paired permutation p-value of mean(diffs) = 0 over all 2^n sign patterns."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return 1.0
    if n > MAX_EXACT_SEEDS:
        raise ValueError(f"exact sign-flip test over {n} pairs would enumerate 2^{n} patterns")
    patterns = np.arange(2 ** n, dtype=np.int64)[:, None]
    signs = ((patterns >> np.arange(n, dtype=np.int64)[None, :]) & 1) * 2 - 1   # [2^n, n] of +-1
    means = np.abs(signs @ d) / n
    observed = abs(d.mean())
    return float(np.mean(means >= observed - TIE_TOLERANCE))


def smallest_sign_flip_p(n: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with n pairs: 2 / 2^n."""
    return min(1.0, 2.0 / 2 ** n) if n > 0 else 1.0


def paired_difference(a: Dict[int, float], b: Dict[int, float]) -> Optional[dict]:
    """A - B over the seeds both have: {"n", "seeds", "diffs", "mean", "ci95", "p_sign_flip", "p_min",
    "positive", "negative"} (which sign is better depends on the metric: the caller says)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    lo, hi = t_interval(diffs)
    return {"n": len(seeds), "seeds": seeds, "diffs": diffs, "mean": float(np.mean(diffs)),
            "ci95": [lo, hi], "p_sign_flip": sign_flip_p(diffs), "p_min": smallest_sign_flip_p(len(seeds)),
            "positive": sum(x > 0 for x in diffs), "negative": sum(x < 0 for x in diffs)}


def pooled_mcnemar(pairs: Sequence[Tuple[np.ndarray, np.ndarray]]) -> dict:
    """Exact McNemar on discordant counts summed over `pairs` of aligned bool arrays (first, second)."""
    from robaudit.audit.metrics import mcnemar_exact_p

    only_first = int(sum(np.sum(f & ~s) for f, s in pairs))
    only_second = int(sum(np.sum(s & ~f) for f, s in pairs))
    n = int(sum(len(f) for f, _ in pairs))
    return {"n": n, "only_first": only_first, "only_second": only_second,
            "p": mcnemar_exact_p(only_first, only_second)}


def temperature_summary(per_epoch: List[List[float]], bounds: Sequence[float], atol: float = 1e-6) -> dict:
    """How far ABSLD's per-class temperatures moved: final min/max, classes at a bound, first
    epoch (1-based) at which any class reached a bound, largest |tau - 1| over the run."""
    taus = np.asarray([row for row in per_epoch if row is not None], dtype=np.float64)
    if taus.size == 0:
        return {}
    lo, hi = float(bounds[0]), float(bounds[1])
    at_bound = (np.abs(taus - lo) <= atol) | (np.abs(taus - hi) <= atol)
    hit_epochs = np.nonzero(at_bound.any(axis=1))[0]
    final = taus[-1]
    return {"final_min": float(final.min()), "final_max": float(final.max()),
            "final_at_lower": int(np.sum(np.abs(final - lo) <= atol)),
            "final_at_upper": int(np.sum(np.abs(final - hi) <= atol)),
            "first_epoch_at_bound": int(hit_epochs[0]) + 1 if hit_epochs.size else None,
            "max_abs_move": float(np.abs(taus - 1.0).max()), "epochs": int(taus.shape[0])}


# ---------------------------------------------------------------------------- the study's tables
# Each metric: (label, how to read it from a run summary, scale to print, digits, which sign is better).
METRICS = {
    "worst": ("PGD-20 worst class", lambda r: r["pgd"]["worst"], 100.0, 1, "higher"),
    "nsd": ("PGD-20 NSD", lambda r: r["pgd"]["nsd"], 1.0, 3, "lower"),
    # Added once every arm's worst class was seen at 0 % (the teacher's cat is at 1 %): exploratory, not
    # the pre-stated endpoint. The mean of the 3 weakest classes still moves when the weakest is floored.
    "weakest3": ("PGD-20 mean of the 3 weakest classes", lambda r: weakest_mean(r["pgd"], 3), 100.0, 1, "higher"),
    "avg": ("PGD-20 avg", lambda r: r["pgd"]["avg"], 100.0, 1, "higher"),
    "clean": ("clean avg", lambda r: r["clean"]["avg"], 100.0, 1, "higher"),
}
PAIRED_METRICS = ("worst", "nsd", "weakest3", "avg")


def train_seconds(arms: Dict[str, Dict[int, dict]], run: dict) -> float:
    """Sum of the run's epoch times (metrics.csv; a resumed run's wall time would count only its
    last part), plus its SAT initialisation's for frl: the whole budget."""
    own = float(run.get("train_seconds") or run["seconds"])
    if run["arm"] == "frl":
        init = arms.get("sat", {}).get(int(run["seed"]))
        own += float(init.get("train_seconds") or init["seconds"]) if init else float("nan")
    return own


def weakest_mean(block: dict, k: int) -> float:
    """Mean accuracy of the k weakest classes of one attack block."""
    return float(np.mean(sorted(c["accuracy"] for c in block["per_class"])[:k]))


def fmt_mean_sd(values, scale=100.0, digits=1) -> str:
    m, sd, _ = mean_sd(values)
    if m is None:
        return "-"
    return f"{scale * m:.{digits}f}" if sd is None else f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def md_table(headers, rows) -> List[str]:
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def by_arm(runs: List[dict]) -> Dict[str, Dict[int, dict]]:
    out: Dict[str, Dict[int, dict]] = {}
    for r in runs:
        out.setdefault(r["arm"], {})[int(r["seed"])] = r
    return out


def arm_rows(arms: Dict[str, Dict[int, dict]]) -> List[list]:
    rows = []
    for arm, seeds in arms.items():
        runs = [seeds[s] for s in sorted(seeds)]
        aa = [r["aa"]["aa"] for r in runs if r.get("aa")]
        budget = sorted({r.get("budget_epochs") for r in runs})
        rows.append([arm, len(runs), "/".join(str(b) for b in budget),
                     fmt_mean_sd([r["clean"]["avg"] for r in runs]), fmt_mean_sd([r["pgd"]["avg"] for r in runs]),
                     fmt_mean_sd([r["pgd"]["worst"] for r in runs]),
                     fmt_mean_sd([r["pgd"]["nsd"] for r in runs], 1.0, 3),
                     fmt_mean_sd([weakest_mean(r["pgd"], 3) for r in runs]),
                     fmt_mean_sd([a["avg"] for a in aa]) + (f" ({len(aa)})" if aa else ""),
                     fmt_mean_sd([a["worst"] for a in aa]), fmt_mean_sd([a["nsd"] for a in aa], 1.0, 3),
                     f"{np.mean([train_seconds(arms, r) for r in runs]):.0f}"])
    return rows


def weakest_class(a: Dict[int, dict], b: Dict[int, dict], seeds: Sequence[int]) -> int:
    """The class with the lowest PGD-20 accuracy averaged over both arms and the seeds: chosen the
    same way for either arm, so the choice favours neither (unlike 'the baseline's worst class')."""
    acc = np.mean([[c["accuracy"] for c in arm[s]["pgd"]["per_class"]] for arm in (a, b) for s in seeds], axis=0)
    return int(np.argmin(acc))


def pooled_class_mcnemar(a: Dict[int, dict], b: Dict[int, dict], seeds: Sequence[int]) -> Optional[dict]:
    """Pooled McNemar on the pair's weakest class: images right under A only vs B only, summed over seeds."""
    from robaudit.audit.paired import load_paired

    k = weakest_class(a, b, seeds)
    pairs = []
    for s in seeds:
        da, db = Path(a[s]["audit_dir"]), Path(b[s]["audit_dir"])
        ra = json.loads((da / "results.json").read_text())
        rb = json.loads((db / "results.json").read_text())
        paired, why = load_paired(da, db, ra, rb, "pgd")
        if paired is None:
            return {"error": why}
        keep = paired.y == k
        pairs.append((paired.before[keep], paired.after[keep]))
    out = pooled_mcnemar(pairs)
    out["class"] = a[seeds[0]]["pgd"]["per_class"][k]["class"]
    return out


def paired_rows(arms: Dict[str, Dict[int, dict]], references: Sequence[str]) -> Tuple[List[list], List[dict]]:
    rows, records = [], []
    for ref in references:
        if ref not in arms:
            continue
        for base in arms:
            if base == ref or (base in references and references.index(base) < references.index(ref)):
                continue
            seeds = sorted(set(arms[ref]) & set(arms[base]))
            if not seeds:
                continue
            mc = pooled_class_mcnemar(arms[ref], arms[base], seeds)
            for key in PAIRED_METRICS:
                label, get, scale, digits, better = METRICS[key]
                # NSD is undefined (None) for a student with every class at 0: that seed drops out of the pair
                d = paired_difference({s: get(arms[ref][s]) for s in seeds if get(arms[ref][s]) is not None},
                                      {s: get(arms[base][s]) for s in seeds if get(arms[base][s]) is not None})
                if d is None:
                    continue
                wins = d["positive"] if better == "higher" else d["negative"]
                losses = d["negative"] if better == "higher" else d["positive"]
                mc_text = ""
                if key == "worst" and mc is not None:
                    mc_text = (mc.get("error") or f"{mc['class']}: {mc['only_first']} vs {mc['only_second']} "
                               f"(p = {mc['p']:.3f})")
                rows.append([f"{ref} − {base}", label + f" ({better} better)", d["n"],
                             f"{scale * d['mean']:+.{digits}f}",
                             f"[{scale * d['ci95'][0]:+.{digits}f}, {scale * d['ci95'][1]:+.{digits}f}]",
                             f"{wins} / {losses}", f"{d['p_sign_flip']:.3f} (min {d['p_min']:.3f})", mc_text])
                records.append({"reference": ref, "baseline": base, "metric": key, **d,
                                **({"mcnemar_weakest_class": mc} if key == "worst" else {})})
    return rows, records


def temperature_rows(arms: Dict[str, Dict[int, dict]]) -> Tuple[List[list], List[dict]]:
    rows, records = [], []
    for arm in ("absld", "absld-sb"):
        for seed, r in sorted(arms.get(arm, {}).items()):
            bounds = r["method_options"].get("tau_bounds", [0.5, 5.0])
            for name in ("tau_adv", "tau_nat"):
                traj = r.get("class_state", {}).get(name)
                if not traj:
                    continue
                t = temperature_summary(traj, bounds)
                records.append({"arm": arm, "seed": seed, "name": name, "beta": r["method_options"].get("beta"),
                                "final": traj[-1], **t})
                rows.append([arm, seed, name, r["method_options"].get("beta"), f"{t['final_min']:.2f}",
                             f"{t['final_max']:.2f}", f"{t['final_at_lower']} / {t['final_at_upper']}",
                             t["first_epoch_at_bound"] or "never", f"{t['max_abs_move']:.2f}"])
    return rows, records


def class_rows(arms: Dict[str, Dict[int, dict]], classes: Sequence[str]) -> List[list]:
    rows = []
    for k, name in enumerate(classes):
        row = [name]
        for seeds in arms.values():
            accs = [r["pgd"]["per_class"][k]["accuracy"] for r in seeds.values()]
            row.append(f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs, ddof=1):.1f}" if len(accs) > 1
                       else f"{100 * accs[0]:.1f}")
        rows.append(row)
    return rows


def study_tables(payload: dict, args, classes: Sequence[str]) -> Tuple[str, dict]:
    """(markdown text, {"paired": [...], "temperatures": [...]}) of the study's runs."""
    arms = by_arm(payload["runs"])
    teacher = payload.get("teacher") or {}
    lines = [f"teacher: {teacher.get('arch')} {teacher.get('method', '(given)')} ({teacher.get('file')})"
             + (f": clean {100 * teacher['clean']['avg']:.1f}, PGD-20 {100 * teacher['pgd']['avg']:.1f} / worst "
                f"{100 * teacher['pgd']['worst']:.1f} / NSD {teacher['pgd']['nsd']:.3f}" if teacher.get("pgd") else ""),
             f"students: {args.student}, {args.epochs} epochs (frl: {args.frl_epochs} fine-tuning epochs on the sat "
             f"student), PGD-{args.steps} inner, {payload['train_images']} train images ({args.val_per_class}/class "
             f"held out, selection PGD-{args.val_steps}); clean / PGD-20 on {payload['test_images']} test images; "
             f"accuracies in %, mean ± SD (ddof 1) over seeds; NSD = population SD / mean over classes", ""]
    lines += md_table(["arm", "seeds", "budget epochs", "clean avg", "PGD-20 avg", "PGD-20 worst", "PGD-20 NSD",
                       "PGD-20 3 weakest", f"AA avg (n={payload['aa_images']}, seeds)", "AA worst", "AA NSD",
                       "train s/run (frl: + its SAT init)"],
                      arm_rows(arms))
    prows, precords = paired_rows(arms, [a for a in ("absld", "absld-sb") if a in arms])
    lines += ["", "Paired over seeds (reference − baseline; difference in points, NSD in units; "
              "wins / losses of the reference; exact two-sided sign-flip p; pooled McNemar on the pair's "
              "weakest class, images kept by the reference only vs by the baseline only, summed over seeds):", ""]
    lines += md_table(["pair", "metric", "seeds", "mean diff", "95% t CI", "ref wins / losses",
                       "sign-flip p", "pooled McNemar (weakest class)"], prows)
    trows, trecords = temperature_rows(arms)
    if trows:
        lines += ["", "ABSLD temperatures (final epoch; classes at the lower / upper bound; first epoch any "
                  "class reached a bound; largest |tau − 1| over the run):", ""]
        lines += md_table(["arm", "seed", "tau", "beta", "final min", "final max", "at lower / upper",
                           "first at bound", "max |tau−1|"], trows)
    lines += ["", "Per-class PGD-20 robust accuracy, mean ± SD over seeds:", ""]
    lines += md_table(["class"] + list(arms), class_rows(arms, classes))
    if payload.get("skipped"):
        lines += ["", f"SKIPPED: {payload['skipped']}"]
    return "\n".join(lines), {"paired": precords, "temperatures": trecords}


def comparison_reports(runs: List[dict], out_dir: Path) -> List[str]:
    """report.py comparison mode: each arm's student vs the RSLAD student of the same seed."""
    from robaudit.audit.report.render import render_report

    arms = by_arm(runs)
    reports = []
    for arm, seeds in arms.items():
        for seed, r in seeds.items():
            base = arms.get("rslad", {}).get(seed)
            if arm == "rslad" or base is None:
                continue
            results = json.loads((Path(r["audit_dir"]) / "results.json").read_text())
            baseline = json.loads((Path(base["audit_dir"]) / "results.json").read_text())
            reports.append(str(render_report(results, Path(out_dir) / f"{arm}_vs_rslad_seed{seed}.html",
                                             baseline=baseline)))
    return reports
