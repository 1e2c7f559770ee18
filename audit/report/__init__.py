"""Stage 4, report: a results document in, one self-contained HTML page out.

`render` holds the entry points (`render_report`, `build_context`, `render_html`,
`load_results`); one module per page part: `sections` (single audit), `comparison`,
`curves`, `training`; `figures` the chart specs, `formatting` the value formatting,
`records` the lookups on results, `redaction` the --redact-paths copy.
"""

from robaudit.audit.report.render import build_context, load_results, render_html, render_report

__all__ = ["build_context", "load_results", "render_html", "render_report"]
