"""Tamper evidence for report pages: `check_page(report.html)` re-renders the page and compares bytes.

The page is a pure function of (embedded results, render options, rendered_at): render.py
draws it from nothing else. So a page is what robaudit rendered exactly when rendering its
own embedded results again, with the options it was rendered with, gives the same bytes.
Editing a visible number, the embedded JSON or the digest breaks that equality.

The one place this module relies on in the page is the *render stamp*, which `stamp_page`
puts right before the last `</body>`:

    <script type="application/json" id="robaudit-render">{...}</script>

holding (STAMP_FORMAT 1):

- `results_digest` / `baseline_digest`: `integrity.results_digest` of the results as given
  to the renderer (before --redact-paths and before large curve bounds are left out), the
  digest the first screen shows and `sha256sum results.json` prints;
- `rendered_at`, `redact_paths`, `embedded` (per side: `as_given`, the embedded copy is the
  results the digest names, no redaction, no trimming; `curve_bounds_left_out`);
- `paired`: what the comparison's paired tests were computed from (per-image outcomes,
  packed), so a comparison page re-renders without the audits' samples.npz;
- `renderer`: robaudit version and commit, and the plotly.js version, that rendered it.

The embedded results themselves are read from the page's `results-data` / `baseline-data`
JSON script elements (documented in the page's provenance section).

What cannot be checked from the page alone: a page rendered with --redact-paths embeds a
copy with paths cut, so its digest cannot be recomputed (the check says so, and recomputes it
when given the results.json); a page whose curve bounds were left out of the embedded copy
(above curves.EMBEDDED_CURVES_BUDGET) cannot be re-rendered without the full results.json,
and is refused, in one line, without it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import List, Optional

import numpy as np

from robaudit.audit.integrity import file_digest, results_digest, tool_identity
from robaudit.audit.report.formatting import script_json
from robaudit.errors import UserError

STAMP_ID = "robaudit-render"
STAMP_FORMAT = 1
RESULTS_ID = "results-data"
BASELINE_ID = "baseline-data"


# --------------------------------------------------------------------------- writing the stamp


def _pack_paired(paired) -> Optional[dict]:
    """render_html's `paired` = (PairedOutcomes or None, why not) as JSON; None when not given."""
    if paired is None:
        return None
    outcomes, why_not = paired
    if outcomes is None:
        return {"why_not": why_not, "outcomes": None}
    y = np.asarray(outcomes.y)
    dtype = "<u2" if y.size == 0 or (y.min() >= 0 and y.max() < 2 ** 16) else "<i8"

    def bits(values) -> str:
        return base64.b64encode(np.packbits(np.asarray(values, dtype=bool)).tobytes()).decode("ascii")

    packed = {"n": int(y.size), "y_dtype": dtype, "y": base64.b64encode(y.astype(dtype).tobytes()).decode("ascii"),
              "before": bits(outcomes.before), "after": bits(outcomes.after)}
    if outcomes.clean_before is not None and outcomes.clean_after is not None:   # the clean-accuracy interval
        packed.update(clean_before=bits(outcomes.clean_before), clean_after=bits(outcomes.clean_after))
    return {"why_not": why_not, "outcomes": packed}


def _unpack_paired(packed: Optional[dict]):
    if packed is None:
        return None
    outcomes = packed.get("outcomes")
    if outcomes is None:
        return None, packed.get("why_not", "")
    from robaudit.audit.paired import PairedOutcomes

    n = int(outcomes["n"])
    if outcomes["y_dtype"] not in ("<u2", "<i8"):
        raise ValueError(f"y_dtype {outcomes['y_dtype']!r}")

    def bits(text) -> np.ndarray:
        return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)

    y = np.frombuffer(base64.b64decode(outcomes["y"]), dtype=outcomes["y_dtype"]).astype(np.int64)
    if y.size != n:
        raise ValueError("paired outcomes: wrong length")
    clean = {f"clean_{side}": bits(outcomes[f"clean_{side}"]) for side in ("before", "after")
             if f"clean_{side}" in outcomes}
    return PairedOutcomes(y=y, before=bits(outcomes["before"]), after=bits(outcomes["after"]), **clean), packed.get(
        "why_not", "")


def renderer_identity(plotly_js_version: str) -> dict:
    tool = tool_identity()
    return {"robaudit": tool["version"], "commit": tool["commit"], "plotly.js": plotly_js_version}


def render_stamp(*, digests, redact_paths: bool, rendered_at: str, paired, embedded: dict,
                 plotly_js_version: str) -> dict:
    """The stamp's content; `digests` = (results, baseline) digests the page names."""
    return {"format": STAMP_FORMAT, "results_digest": digests[0], "baseline_digest": digests[1],
            "rendered_at": rendered_at, "redact_paths": bool(redact_paths),
            "embedded": embedded, "paired": _pack_paired(paired),
            "renderer": renderer_identity(plotly_js_version)}


def stamp_page(page: str, stamp: dict) -> str:
    """The page with the stamp element before its last </body> (at the end when it has none)."""
    element = f'<script type="application/json" id="{STAMP_ID}">{script_json(stamp)}</script>\n'
    at = page.rfind("</body>")
    return page + element if at < 0 else page[:at] + element + page[at:]


# --------------------------------------------------------------------------- reading a page


class _JsonScripts(HTMLParser):
    """The text of every <script> element with an id, by id (a repeated id is kept as a list)."""

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.found: dict = {}
        self._current: Optional[str] = None
        self._text: List[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._current = dict(attrs).get("id")
            self._text = []

    def handle_data(self, data):
        if self._current is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._current is not None:
            self.found.setdefault(self._current, []).append("".join(self._text))
            self._current = None


@dataclass
class PageCheck:
    problems: List[str] = field(default_factory=list)   # one line each; empty: the page is as rendered
    notes: List[str] = field(default_factory=list)      # what could not be checked, and why
    results_digest: Optional[str] = None                # the digests the page names
    baseline_digest: Optional[str] = None


def _read_page(html_path: Path) -> tuple[bytes, dict]:
    try:
        raw = html_path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no report file {html_path}") from None
    except IsADirectoryError:
        raise UserError(f"{html_path} is a directory; pass the report.html inside it") from None
    except OSError as err:
        raise UserError(f"cannot read {html_path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{html_path} is not UTF-8 text; is it a robaudit report?") from None
    parser = _JsonScripts()
    parser.feed(text)
    parser.close()
    return raw, parser.found


def _one_json(found: dict, element_id: str, html_path: Path, required: bool):
    texts = found.get(element_id, [])
    if not texts and not required:
        return None
    if len(texts) != 1:
        raise _Tampered(f"{html_path.name} has {len(texts)} script elements with id {element_id!r}; "
                        "a robaudit page has exactly one")
    try:
        return json.loads(texts[0])
    except json.JSONDecodeError as err:
        raise _Tampered(f"{html_path.name}: the {element_id!r} element is not valid JSON ({err.msg}, "
                        f"column {err.colno})") from None


class _Tampered(Exception):
    """A finding that ends the check early (the page cannot be re-rendered as it stands)."""


def _difference(page: bytes, again: bytes) -> str:
    """Where two pages first differ, as line number and the two texts around it."""
    at, block = 0, 1 << 16
    while at < min(len(page), len(again)) and page[at:at + block] == again[at:at + block]:
        at += block      # whole equal blocks first: pages are megabytes, a byte loop is slow
    at = next((i for i in range(at, min(at + block, len(page), len(again))) if page[i] != again[i]),
              min(at + block, len(page), len(again)))
    line = page.count(b"\n", 0, at) + 1

    def around(text: bytes) -> str:
        return text[max(0, at - 30):at + 30].decode("utf-8", "replace").replace("\n", " ")

    return f"first difference at line {line}: page has {around(page)!r}, re-render has {around(again)!r}"


def _load_given(path) -> tuple[dict, str]:
    from robaudit.audit.report.render import load_results

    return load_results(path), file_digest(path)


# --------------------------------------------------------------------------- checking a page

SIDES = (("results", RESULTS_ID, "results.json"), ("baseline", BASELINE_ID, "BEFORE results.json"))


def embedded_record(given: Optional[dict], embedded: Optional[dict], *, redact_paths: bool,
                    bounds_left_out: bool) -> Optional[dict]:
    """How the page's copy of one side relates to the results it was given (stamp["embedded"]).
    Under --redact-paths a copy is never "as given", also when it had no path to cut: a re-render
    from that copy must say the same as the first rendering did."""
    if given is None:
        return None
    return {"as_given": not redact_paths and embedded == given, "curve_bounds_left_out": bool(bounds_left_out)}


def check_page(html_path, results_path=None, baseline_path=None) -> List[str]:
    """Findings (one line each) on a report page; empty when re-rendering its embedded results
    gives its exact bytes and the digests it names are those of the results it holds.
    `results_path` / `baseline_path`: the results.json files the page was rendered from, needed
    for a page whose embedded copy had curve bounds left out, and used to check the digest of a
    --redact-paths page. Bad input (no such file, not a robaudit page, a page this robaudit
    cannot re-render) raises UserError."""
    return inspect_page(html_path, results_path, baseline_path).problems


def inspect_page(html_path, results_path=None, baseline_path=None) -> PageCheck:
    """check_page's findings plus notes on what could not be checked and the digests the page names."""
    html_path = Path(html_path)
    raw, found = _read_page(html_path)
    check = PageCheck()
    try:
        _inspect(html_path, raw, found, {"results": results_path, "baseline": baseline_path}, check)
    except _Tampered as finding:
        check.problems.append(str(finding))
    return check


def _inspect(html_path: Path, raw: bytes, found: dict, paths: dict, check: PageCheck) -> None:
    name = html_path.name
    if RESULTS_ID not in found:
        raise UserError(f"{html_path} has no embedded results ({RESULTS_ID!r}); is it a robaudit report?")
    stamp = _one_json(found, STAMP_ID, html_path, required=False)
    if stamp is None:
        raise _Tampered(f"{name} has no render stamp ({STAMP_ID!r}): it was not rendered by a robaudit that "
                        "stamps its pages, or the stamp was removed; re-render it with `robaudit report`")
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        raise _Tampered(f"{name}: the render stamp is not format {STAMP_FORMAT}")
    check.results_digest, check.baseline_digest = stamp.get("results_digest"), stamp.get("baseline_digest")
    sources = {}
    for side, element_id, label in SIDES:
        embedded = _one_json(found, element_id, html_path, required=side == "results")
        named = stamp.get(f"{side}_digest")
        record = (stamp.get("embedded") or {}).get(side)
        if (embedded is None) != (named is None) or (embedded is None) != (record is None):
            raise _Tampered(f"{name}: the render stamp and the embedded {element_id!r} disagree on whether "
                            f"the page holds {side}")
        if embedded is None:
            sources[side] = None
            continue
        sources[side] = _source(name, side, label, embedded, named, record, stamp, paths[side], check)
    _compare(html_path, raw, stamp, sources, check)


def _source(name: str, side: str, label: str, embedded, named: str, record: dict, stamp: dict, path,
            check: PageCheck):
    """The results to re-render one side from, after checking the digest the page names for it."""
    if path is not None:
        given, digest = _load_given(path)
        if digest != named:
            raise _Tampered(f"{name} names {side} sha256 {named}, but {path} has sha256 {digest}")
        return given
    if record.get("as_given"):
        digest = results_digest(embedded)
        if digest != named:
            raise _Tampered(f"{name} names {side} sha256 {named}, but its embedded {side} have sha256 "
                            f"{digest}: the embedded JSON or the digest was edited")
        return embedded
    if record.get("curve_bounds_left_out"):
        raise UserError(f"{name} embeds its {side} without the curves' 95% bounds (left out above the page's "
                        f"size budget), so the page cannot be re-rendered from itself; pass the {label} it "
                        f"was rendered from (sha256 {named})")
    if not stamp.get("redact_paths"):
        raise _Tampered(f"{name}: its embedded {side} are not the results it was rendered from, and the "
                        "stamp gives no reason (neither --redact-paths nor left-out curve bounds)")
    check.notes.append(f"{name} was rendered with --redact-paths: its embedded {side} have paths cut, so "
                       f"the {side} digest it names ({named}) was not recomputed; pass the {label} to check it")
    return embedded


def _compare(html_path: Path, raw: bytes, stamp: dict, sources: dict, check: PageCheck) -> None:
    from robaudit.audit.report.render import current_plotly_js_version, render_html

    try:
        paired = _unpack_paired(stamp.get("paired"))
    except (KeyError, TypeError, ValueError) as err:
        raise _Tampered(f"{html_path.name}: the render stamp's paired outcomes are malformed ({err})") from None
    try:
        again = render_html(sources["results"], baseline=sources["baseline"],
                            redact_paths=bool(stamp.get("redact_paths")), rendered_at=str(stamp.get("rendered_at")),
                            paired=paired, digests=(stamp.get("results_digest"), stamp.get("baseline_digest")),
                            gates=stamp.get("gates") if isinstance(stamp.get("gates"), dict) else None)
    except UserError as err:   # the embedded JSON no longer passes the report's own checks
        raise _Tampered(f"{html_path.name}: its embedded results cannot be rendered: {err}") from None
    except Exception as err:   # noqa: BLE001  a page robaudit rendered re-renders; this one's data does not
        raise _Tampered(f"{html_path.name}: its embedded results cannot be rendered "
                        f"({type(err).__name__}: {err})".splitlines()[0]) from None
    again_bytes = again.encode("utf-8")
    if again_bytes == raw:
        return
    renderer = renderer_identity(current_plotly_js_version())
    if stamp.get("renderer") != renderer:
        raise UserError(f"{html_path.name} differs from its re-render, but it was rendered by "
                        f"{_describe(stamp.get('renderer'))} and this is {_describe(renderer)}; check it "
                        "with the robaudit that rendered it")
    check.problems.append(f"{html_path.name} is not what robaudit renders from its embedded results (edited "
                          f"after rendering?): {_difference(raw, again_bytes)}")


def _describe(renderer) -> str:
    if not isinstance(renderer, dict):
        return "an unknown renderer"
    commit = renderer.get("commit")
    return (f"robaudit {renderer.get('robaudit')}" + (f" (commit {commit})" if commit else "")
            + f" with plotly.js {renderer.get('plotly.js')}")
