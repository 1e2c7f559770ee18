"""One audit with its files: engine.run_scan (results.json, samples.npz), then the report,
then the gates.

The engine computes and writes the results contract; the page is rendered here, by the
caller's choice (`ScanConfig.write_report`), so the engine never imports the report.
The order is the one `robaudit scan` has always had: a failing gate still leaves the
report beside results.json, and a bad gate setting fails before anything runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from robaudit.audit import distributed
from robaudit.audit.engine import ScanConfig, build_attacks, check_gate_config, check_gates, run_scan


def scan_and_report(cfg: ScanConfig, *, model, data, extra: Optional[dict] = None) -> dict:
    """run_scan, then OUT/report.html (when cfg.write_report and cfg.out_dir), then the gates."""
    check_gate_config(cfg, list(build_attacks(cfg)))   # before anything runs or is written
    results = run_scan(replace(cfg, fail_under_worst=None, fail_over_nsd=None), model=model, data=data,
                       extra=extra)
    if cfg.write_report and cfg.out_dir is not None and distributed.current().is_main:
        from robaudit.audit.report.render import render_report

        render_report(results, Path(cfg.out_dir) / "report.html", redact_paths=cfg.redact_paths,
                      gates={"fail_under_worst": cfg.fail_under_worst, "fail_over_nsd": cfg.fail_over_nsd,
                             "attack": cfg.gate_attack})
    check_gates(results, cfg)
    return results
