"""The HTML audit report's entry points: results.json -> plain context -> one HTML file.

This module holds what callers use: `load_results` and `validate_results` (read and
check a results.json), `build_context` (results, and in comparison mode the baseline
results, -> the plain dicts and lists the template renders), `render_html` and
`render_report` (jinja2 rendering, written atomically). The context is assembled from
one builder per page section: `report_sections` (verdict, flags, per-class, target
flow, examples, provenance), `report_comparison` (before/after), `report_training`
(remediation curves and trajectories); `report_figures` holds the plotly specs,
`report_format` the value formatting, `report_records` the lookups on results and
`report_redaction` the `--redact-paths` copy; `headline` the first-screen card, `plain` the
readable settings and remediation sentences, `ledger` the checks ledger and replays, `svg`
the figures drawn as inline SVG, `nway` the N-way comparison page.

The flow is the one coverage.py uses for its HTML report: `build_context` turns the
results into plain data and a jinja2 template renders them. The page is a pure view
of the results: the same results render to the same bytes apart from the render
timestamp, because figure ids are fixed, dict order follows the results and nothing
reads the clock except `rendered_at`.

Safety: every string that came from a user or a model (class names, paths, the
command, check messages) reaches the page only through jinja2 autoescaping, or as
JSON inside a `<script type="application/json">` with `<`, `>` and `&` written as
`\\u003c`-style escapes. Figure labels are HTML-escaped in the specs (figures.py) and
drawn by svg.py, which decodes them and escapes them again for XML.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from markupsafe import Markup

from robaudit import __version__ as ROBAUDIT_VERSION
from robaudit.audit.integrity import results_digest
from robaudit.audit.io import write_bytes_atomic
from robaudit.audit.report import integrity as page_integrity
from robaudit.audit.report.comparison import comparison_section
from robaudit.audit.report.curves import curves_sections, embedded_results, validate_curves
from robaudit.audit.report.formatting import (
    display, eps_as_fraction_of_255, finite, json_safe, pct, pp, ratio, rounded, script_json,
)
from robaudit.audit.report.records import headline_key
from robaudit.audit.report.glossary import glossary, term_anchor
from robaudit.audit.report.headline import headline_section
from robaudit.audit.report.ledger import ledger_section, replay_section
from robaudit.audit.report.redaction import basename, redact_results, redact_text
from robaudit.audit.report.svg import render_svg
from robaudit.audit.report.sections import (
    checks_section, examples_section, per_class_section, provenance_section, target_flow_section, verdict_section,
)
from robaudit.audit.report.training import training_section
from robaudit.audit.results_schema import validate_results
from robaudit.errors import UserError

__all__ = ["build_context", "render_report", "render_html", "load_results", "validate_results",
           "redact_results", "headline_key", "eps_as_fraction_of_255"]

# --------------------------------------------------------------------------- loading


def load_results(path) -> dict:
    """Read and validate a results.json; any problem becomes a one-line UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"results file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; pass the results.json file inside it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; pass a results.json written by `robaudit scan`") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "pass a results.json written by `robaudit scan`"
        ) from None
    validate_results(results, source=str(path))
    return results


# --------------------------------------------------------------------------- public API


def build_context(results: dict, *, baseline: dict | None = None, redact_paths: bool = False,
                  paired=None, gates: dict | None = None, digests=None) -> dict:
    """Plain dicts and lists the template renders: results -> what each section shows.

    With `baseline` (the BEFORE results) the context also holds the comparison
    section, which the page then opens with; `paired` = (audit/paired.PairedOutcomes or
    None, why not) adds its paired tests. `redact_paths` cuts filesystem paths to
    basenames everywhere, including the embedded results JSON. `gates`
    ({"fail_under_worst", "fail_over_nsd", "attack"}) puts the policy result on the first screen.
    `digests` = (results, baseline) digests the page names (`integrity`), computed from the
    given results when None.
    """
    validate_results(results, source="results")
    validate_curves(results, source="results")
    if baseline is not None:
        validate_results(baseline, source="baseline results")
        validate_curves(baseline, source="baseline results")
    if digests is None:   # of the results as given (before redaction and trimming), as the page embeds
        # them: json_safe turns non-finite floats (never in a results.json robaudit wrote) into null
        digests = (results_digest(json_safe(results)),
                   results_digest(json_safe(baseline)) if baseline is not None else None)
    integrity = {"results_digest": digests[0], "baseline_digest": digests[1], "tool": results.get("tool")}
    digest_of = results   # the first screen names the results as given, before any redaction
    gates = {k: v for k, v in (gates or {}).items() if v is not None}
    if not (gates.keys() & {"fail_under_worst", "fail_over_nsd"}):
        gates = None      # no gate given: no policy line (an "attack" alone gates nothing)
    if redact_paths:
        results = redact_results(results)
        baseline = redact_results(baseline) if baseline is not None else None
    figures: dict = {}
    verdict = verdict_section(results)
    headline = headline_section(digest_of, verdict, gates, digest=digests[0])
    checks = checks_section(results)
    ledger = ledger_section(results)
    replay = replay_section(results)
    if ledger is not None:   # the ledger knows which failed checks matter: they are the warnings
        verdict["warning_count"] = ledger["failed_warnings"]
    per_class = per_class_section(results, figures)
    curves = curves_sections(results, figures)
    target_flow = target_flow_section(results, figures)
    examples = examples_section(results)
    outcomes, why_not = paired if paired is not None else (None, "")
    comparison = (comparison_section(results, baseline, figures, outcomes, why_not)
                  if baseline is not None else None)
    training = training_section(results, figures)
    provenance = [provenance_section(results, "This audit" if baseline is None else "After (this audit)", "prov-run")]
    if baseline is not None:
        provenance.append(provenance_section(baseline, "Before (baseline)", "prov-baseline"))
    sections = [("verdict", "Verdict"), ("checks", "Checks" if ledger is not None else "Reliability flags"), ("per-class", "Per-class robustness"),
                ("target-flow", "Where attacks push each class"), ("examples", "Example adversarial images")]
    sections[3:3] = [(item["anchor"], item["heading"]) for item in curves]   # right after per-class
    if replay is not None:
        sections.insert(3, ("replay", "Failures replayed"))
    if comparison is not None:   # a comparison is what its reader came for: it opens the page
        sections.insert(0, ("comparison", "Before and after"))
        if training is not None:
            sections.insert(1, ("training", "Remediation training"))
    elif training is not None:
        sections.append(("comparison", "Remediation training"))
    sections.append(("provenance", "Provenance"))
    sections.append(("glossary", "Glossary"))
    embedded, bounds_left_out = embedded_results(results)   # per-class curve bounds dropped when large
    embedded_baseline, baseline_bounds_left_out = embedded_results(baseline)
    return {
        "title": page_title(results, baseline, verdict),
        "headline": headline, "glossary": glossary(),
        # What `verify report.html` needs, besides the embedded results, to re-render this page.
        "render_options": {"gates": gates} if gates else None,
        "nav": [{"id": anchor, "label": label} for anchor, label in sections],
        "verdict": verdict, "checks": checks, "ledger": ledger, "replay": replay,
        "per_class": per_class, "curves": curves, "target_flow": target_flow,
        "examples": examples, "comparison": comparison, "training": training, "provenance": provenance,
        "figures": figures,
        "redacted": redact_paths, "integrity": integrity,
        "embedded": {"results": embedded, "baseline": embedded_baseline,
                     "curve_bounds_left_out": bounds_left_out or baseline_bounds_left_out},
    }


def page_title(results: dict, baseline: dict | None, verdict: dict) -> str:
    """Says what the page is: one audit, or a before/after of which remediation method."""
    model_name, dataset = verdict["model_name"], verdict["dataset_name"]
    if baseline is None:
        return f"Robustness audit: {model_name} on {dataset}"
    method = (results.get("training") or {}).get("method")
    before_name = basename((baseline["model"].get("path") or "")) or "model"
    if method:
        return f"Before and after remediation with {str(method).upper()}: {before_name} → {model_name} on {dataset}"
    return f"Before and after: {before_name} → {model_name} on {dataset}"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("robaudit.templates", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters.update({
        "pct": pct, "pp": pp, "ratio": ratio,
        "pct_ci": lambda ci: "—" if ci is None or None in ci else f"{ci[0] * 100:.1f}–{ci[1] * 100:.1f}%",
        "delta_ratio": lambda d: "—" if finite(d) is None else f"{round(d, 3) + 0.0:+.3f}",
        "count": lambda n: f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else display(n),
        "seconds": lambda s: "—" if finite(s) is None else f"{s:.1f} s",
        "sig4": lambda v: "—" if finite(v) is None else f"{v:.4g}",
        "sort_value": lambda v: "" if finite(v) is None else repr(rounded(v, 9)),
        "script_json": lambda value: Markup(script_json(value)),
    })
    env.globals["draw_chart"] = render_svg
    env.globals["term_anchor"] = term_anchor
    return env


def _asset(name: str, closing_tag: str) -> Markup:
    """A packaged CSS/JS file, inlined as-is (trusted project code, not user data)."""
    text = importlib.resources.files("robaudit.templates").joinpath(name).read_text(encoding="utf-8")
    if closing_tag in text.lower():
        raise RuntimeError(f"{name} contains {closing_tag!r} and cannot be inlined")
    return Markup(text)


def current_plotly_js_version() -> str:
    """The render stamp's charting-library field (integrity.renderer_identity): the charts are
    static SVG drawn by robaudit itself since issue 25, so no plotly.js version applies."""
    return "none (static SVG)"


def render_html(results: dict, *, baseline: dict | None = None, redact_paths: bool = False,
                rendered_at: str | None = None, paired=None, gates: dict | None = None, digests=None) -> str:
    """The report page as a string (what render_report writes), with its render stamp
    (audit/report/integrity.py: what `robaudit verify report.html` re-renders it from).
    `digests` = (results, baseline) digests to name instead of those of the given results:
    only for re-rendering a page from its redacted embedded copy."""
    if redact_paths and paired is not None:   # why there is no paired test may name samples.npz's path
        paired = (paired[0], redact_text(paired[1]))
    context = build_context(results, baseline=baseline, redact_paths=redact_paths, paired=paired, gates=gates,
                            digests=digests)
    if rendered_at is None:
        rendered_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    plotly_js_version = current_plotly_js_version()
    page = _environment().get_template("report.html.j2").render(
        **context, rendered_at=rendered_at, renderer_version=ROBAUDIT_VERSION,
        report_css=_asset("report.css", "</style"), report_js=_asset("report.js", "</script"),
    )
    embedded = {side: page_integrity.embedded_record(given, context["embedded"][side], redact_paths=redact_paths,
                                                     bounds_left_out=embedded_results(given)[1])
                for side, given in (("results", results), ("baseline", baseline))}
    stamp = page_integrity.render_stamp(
        digests=(context["integrity"]["results_digest"], context["integrity"]["baseline_digest"]),
        redact_paths=redact_paths, rendered_at=rendered_at, paired=paired, embedded=embedded,
        plotly_js_version=plotly_js_version)
    if context["render_options"] is not None:   # the gates the page's policy line was checked against
        stamp["gates"] = context["render_options"]["gates"]
    return page_integrity.stamp_page(page, stamp)


def render_report(results: dict, out_path, *, baseline: dict | None = None, redact_paths: bool = False,
                  rendered_at: str | None = None, paired=None, gates: dict | None = None) -> Path:
    """Write the self-contained HTML report to `out_path` atomically; return its path."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory; pass the report file name, e.g. {out_path / 'report.html'}")
    page = render_html(results, baseline=baseline, redact_paths=redact_paths, rendered_at=rendered_at,
                       paired=paired, gates=gates)
    return _write_page(out_path, page)


def render_nway_html(candidates: list, *, rendered_at: str | None = None, redact_paths: bool = False) -> str:
    """The N-way comparison page (audit/report/nway.py) as a string."""
    from robaudit.audit.report.nway import nway_context

    for candidate in candidates:
        validate_results(candidate.results, source=candidate.label or "results")
    context = nway_context(candidates, redact_paths=redact_paths)
    if rendered_at is None:
        rendered_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return _environment().get_template("report_nway.html.j2").render(
        **context, glossary=glossary(), rendered_at=rendered_at, renderer_version=ROBAUDIT_VERSION,
        report_css=_asset("report.css", "</style"), report_js=_asset("report.js", "</script"),
    )


def render_nway_report(candidates: list, out_path, *, rendered_at: str | None = None,
                       redact_paths: bool = False) -> Path:
    """Write the N-way comparison page to `out_path` atomically; return its path."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory; pass the report file name, e.g. {out_path / 'comparison.html'}")
    page = render_nway_html(candidates, rendered_at=rendered_at, redact_paths=redact_paths)
    return _write_page(out_path, page)


def _write_page(out_path: Path, page: str) -> Path:
    """Write a rendered page atomically (a failed write leaves no half page); return its path."""
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out_path, page.encode("utf-8"))
    except OSError as err:
        raise UserError(f"cannot write the report to {out_path}: {err.strerror or err}") from None
    return out_path
