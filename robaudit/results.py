"""Typed views of a results document: `Audit`, `Comparison`, `Remediation`.

Like Fairlearn's MetricFrame, an `Audit` answers the usual questions directly
(`.per_class`, `.headline`, `.worst`, `.nsd`, `.block(attack)`) and keeps the results
document it was built from (`.results`, the results.json contract, docs/results-schema.md)
for everything else. "The" result is the block `audit/headline.py` names, as in the CLI's
table, the report's verdict and the gates.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

from robaudit.audit.headline import ENSEMBLE_KEY, headline_key, summary_block
from robaudit.errors import UserError

__all__ = ["Audit", "Block", "ClassRecord", "Comparison", "ClassChange", "Remediation"]


@dataclass(frozen=True)
class ClassRecord:
    """One class under one attack: accuracy = correct / n (None when n = 0), ci95 its Wilson interval."""
    index: int
    name: str
    n: int
    correct: int
    accuracy: Optional[float]
    ci95: Tuple[float, float]


@dataclass(frozen=True)
class Block:
    """One attack's (or the ensemble's) summary: avg/worst over evaluated classes, NSD = SD/mean."""
    attack: str
    per_class: List[ClassRecord]
    avg: Optional[float]
    worst: Optional[float]
    worst_class: Optional[str]
    nsd: Optional[float]

    @classmethod
    def from_results(cls, attack: str, record: dict) -> "Block":
        rows = [ClassRecord(index=k, name=c["class"], n=int(c["n"]), correct=int(c["correct"]),
                            accuracy=c["accuracy"], ci95=tuple(c["ci95"]))
                for k, c in enumerate(record["per_class"])]
        return cls(attack=attack, per_class=rows, avg=record.get("avg"), worst=record.get("worst"),
                   worst_class=record.get("worst_class"), nsd=record.get("nsd"))

    @property
    def worst_record(self) -> Optional[ClassRecord]:
        return next((r for r in self.per_class if r.name == self.worst_class), None)


class Audit:
    """A finished audit: the results document plus where its files are (when it has some)."""

    def __init__(self, results: dict, *, out_dir: Optional[Path] = None):
        from robaudit.audit.results_schema import validate_results

        validate_results(results)
        self.results = results
        self.out_dir = Path(out_dir) if out_dir is not None else None

    @classmethod
    def load(cls, path) -> "Audit":
        """Read a results.json (any version the report reads, old files included)."""
        from robaudit.audit.report.render import load_results

        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        return cls(load_results(path), out_dir=path.parent)

    # -- the questions -------------------------------------------------------------------------
    @property
    def classes(self) -> List[str]:
        return list(self.results["dataset"]["classes"])

    @property
    def attacks(self) -> List[str]:
        """Blocks present, in run order, the ensemble last."""
        names = list(self.results["attacks"])
        return names + ([ENSEMBLE_KEY] if self.results.get(ENSEMBLE_KEY) else [])

    @property
    def headline_key(self) -> str:
        return headline_key(self.results)

    @property
    def headline(self) -> Block:
        return self.block(self.headline_key)

    def block(self, attack: str) -> Block:
        record = summary_block(self.results, attack)
        if record is None:
            raise KeyError(f"no {attack!r} results in this audit; it has: {', '.join(self.attacks)}")
        return Block.from_results(attack, record)

    @property
    def per_class(self) -> List[ClassRecord]:
        """The headline's per-class records (dataset class order)."""
        return self.headline.per_class

    @property
    def worst(self) -> Optional[ClassRecord]:
        """The headline's worst class (lowest accuracy; the lower index on ties)."""
        return self.headline.worst_record

    @property
    def nsd(self) -> Optional[float]:
        return self.headline.nsd

    @property
    def checks(self) -> List[dict]:
        return list(self.results["checks"])

    # -- outputs -------------------------------------------------------------------------------
    def to_json(self) -> str:
        """results.json's exact text (as `robaudit scan` writes it)."""
        from robaudit.audit.results_schema import results_json_text

        return results_json_text(self.results)

    def save(self, path) -> Path:
        from robaudit.audit.io import write_text_atomic

        path = Path(path)
        write_text_atomic(path, self.to_json())
        return path

    def write_report(self, path, *, baseline: Optional["Audit"] = None, redact_paths: bool = False) -> Path:
        """The HTML report (a before/after page when `baseline` is given)."""
        if baseline is not None:
            return self.compare(baseline).write_report(path, redact_paths=redact_paths)
        from robaudit.audit.report.render import render_report

        return render_report(self.results, path, redact_paths=redact_paths)

    def compare(self, baseline: "Audit") -> "Comparison":
        """This audit (after) against `baseline` (before)."""
        return Comparison(before=baseline, after=self)

    def _repr_html_(self) -> str:
        head = self.headline
        esc = html.escape
        verdict = (f"<b>{esc(head.attack)}</b>: worst class <b>{esc(str(head.worst_class))}</b> "
                   f"{_pct(head.worst)}, mean {_pct(head.avg)}, NSD {_num(head.nsd)}")
        rows = "".join(f"<tr><td>{esc(r.name)}</td><td>{r.n}</td><td>{_pct(r.accuracy)}</td>"
                       f"<td>{_pct(r.ci95[0])}&ndash;{_pct(r.ci95[1])}</td></tr>" for r in head.per_class)
        model = esc(str(self.results["model"].get("path")))
        config = self.results["config"]
        eps = f"{config['eps_255']:g}/255" if config.get("eps_255") is not None else f"{config.get('eps')}"
        return (f"<div class='robaudit-audit'><p>robaudit audit of <code>{model}</code> "
                f"(eps {esc(eps)}, {esc(str(config.get('norm') or 'linf'))})</p><p>{verdict}</p><table><thead><tr><th>class</th><th>n</th><th>accuracy</th>"
                f"<th>95% CI</th></tr></thead><tbody>{rows}</tbody></table></div>")

    def __repr__(self) -> str:
        head = self.headline
        return (f"Audit({head.attack}: worst {head.worst_class!r} {_pct(head.worst)}, "
                f"avg {_pct(head.avg)}, NSD {_num(head.nsd)}; {len(self.classes)} classes)")


def _pct(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


@dataclass(frozen=True)
class ClassChange:
    name: str
    before: Optional[float]
    after: Optional[float]

    @property
    def delta(self) -> Optional[float]:
        return None if self.before is None or self.after is None else self.after - self.before


@dataclass
class Comparison:
    """Two audits of the same classes on the block both hold (report.comparison.comparison_key)."""
    before: Audit
    after: Audit
    key: str = field(init=False)

    def __post_init__(self):
        from robaudit.audit.report.comparison import comparison_key

        if self.before.classes != self.after.classes:
            raise UserError("cannot compare: the audits have different class lists "
                            "(dataset.classes must match in names and order)")
        self.key = comparison_key(self.after.results, self.before.results)

    @property
    def per_class(self) -> List[ClassChange]:
        b, a = self.before.block(self.key), self.after.block(self.key)
        return [ClassChange(rb.name, rb.accuracy, ra.accuracy) for rb, ra in zip(b.per_class, a.per_class)]

    @property
    def worst_delta(self) -> Optional[float]:
        b, a = self.before.block(self.key).worst, self.after.block(self.key).worst
        return None if b is None or a is None else a - b

    @property
    def nsd_delta(self) -> Optional[float]:
        b, a = self.before.block(self.key).nsd, self.after.block(self.key).nsd
        return None if b is None or a is None else a - b

    @property
    def warnings(self) -> List[str]:
        """What makes the deltas not like for like (dataset, budget, settings)."""
        from robaudit.audit.report.comparison import like_for_like

        return like_for_like(self.after.results, self.before.results, self.key)

    def write_report(self, path, *, redact_paths: bool = False) -> Path:
        """The comparison page; with both audits' samples.npz on disk, the paired per-class tests too."""
        from robaudit.audit.report.render import render_report

        paired = None
        if self.before.out_dir is not None and self.after.out_dir is not None:
            from robaudit.workflows import paired_outcomes

            paired = paired_outcomes(self.before.results, self.after.results, self.before.out_dir,
                                     self.after.out_dir)
        return render_report(self.after.results, path, baseline=self.before.results, redact_paths=redact_paths,
                             paired=paired)

    def __repr__(self) -> str:
        return (f"Comparison({self.key}: worst {_signed(self.worst_delta)} pp, NSD {_signed(self.nsd_delta, 1)})")


def _signed(value, scale=100) -> str:
    return "-" if value is None else f"{scale * value:+.{1 if scale == 100 else 3}f}"


@dataclass
class Remediation:
    """A remediation run: the trained student (nn.Module), its audit, the teacher's (None
    without a teacher), and the trainer's summary (training block, exports)."""
    student: Any
    student_audit: Audit
    teacher_audit: Optional[Audit]
    summary: dict
    out_dir: Path

    @property
    def comparison(self) -> Optional[Comparison]:
        return None if self.teacher_audit is None else self.student_audit.compare(self.teacher_audit)
