"""Value formatting for the HTML audit report, shared by every section and the template.

Results hold raw numbers, possibly NaN or missing, and user-chosen strings. These
helpers turn them into what the page shows: JSON-safe floats, percentages and
percentage points, 8/255-style budgets, provenance values as text, plotly-safe label
text, JSON that may sit inside a `<script>` element, and data: URIs for the base64
PNGs the scan embedded (checked to be PNGs, so never a link). They know nothing about
the results layout; `report_records` does.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import math
import re
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


def finite(value: Any) -> float | None:
    """A JSON-safe float: NaN, infinities and non-numbers become None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (which JSON.parse rejects) with null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    return value


def rounded(value: Any, digits: int = 6) -> float | None:
    value = finite(value)
    return None if value is None else round(value, digits)


def ci(entry: dict) -> tuple[float | None, float | None]:
    """The (low, high) 95% interval of a per-class entry; (None, None) when absent."""
    interval = entry.get("ci95")
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return finite(interval[0]), finite(interval[1])
    return None, None


def plotly_text(text: Any) -> str:
    """Text for plotly labels: it parses a small HTML subset and decodes entities, so
    escaping &, < and > makes any class name display literally and inject nothing."""
    return html.escape(str(text), quote=False)


NORM_LABELS = {"linf": "L∞", "l2": "L2", "l1": "L1"}


def budget_text(config: dict) -> str:
    """The perturbation budget as users quote it: k/255 under L-inf (results without a norm are
    L-inf), the plain radius under L2/L1 (k/255 means nothing there)."""
    norm = config.get("norm") or "linf"
    if norm == "linf":
        return eps_as_fraction_of_255(config.get("eps"), config.get("eps_255"))
    eps = finite(config.get("eps"))
    return "—" if eps is None else f"{eps:g} ({NORM_LABELS.get(norm, norm)})"


def norm_label(config: dict) -> str:
    norm = config.get("norm") or "linf"
    return NORM_LABELS.get(norm, norm)


def eps_as_fraction_of_255(eps: float | None, eps_255: float | None = None) -> str:
    """8/255 style: how perturbation budgets are usually quoted for [0, 1] images."""
    k = finite(eps_255)
    if k is None:
        eps = finite(eps)
        if eps is None:
            return "—"
        k = eps * 255
    if abs(k - round(k)) < 1e-3:
        return f"{round(k)}/255"
    return f"{k:.2f}/255"


def display(value: Any) -> str:
    """Provenance values as text: strings as-is, structures as compact sorted JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False)


def pct(value: float | None) -> str:
    value = finite(value)
    return "—" if value is None else f"{value * 100:.1f}%"


def pp(value: float | None) -> str:
    value = finite(value)
    # + 0.0 turns a rounded -0.0 into 0.0: a change that rounds to zero reads "+0.0 pp", not "-0.0 pp"
    return "—" if value is None else f"{round(value * 100, 1) + 0.0:+.1f} pp"


def ratio(value: Any) -> str:
    value = finite(value)
    return "—" if value is None else f"{value:.3f}"


def script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no raw <, > or & (so no "</script>"
    or "<!--" can appear), and no U+2028/2029 line separators."""
    text = json.dumps(json_safe(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def png_data_uri(value: Any) -> str | None:
    """A data: URI for a base64 PNG, or None when the value is not one (never a link)."""
    if not isinstance(value, str):
        return None
    text = "".join(value.split())
    if not _BASE64_TEXT.match(text):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + text
