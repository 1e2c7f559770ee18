"""What a reviewer checks a file against: the results digest and the tool's identity.

`results_digest(results)` is the sha256 of results.json's exact bytes as robaudit writes
them (`results_schema.results_json_text`), so `sha256sum results.json` gives the same hex
digest without robaudit. The report's first screen, the evidence file and `robaudit verify`
all name results by this digest.

`tool_identity()` is the robaudit version plus, when robaudit runs from a git checkout,
the commit it runs at (and "+dirty" when the checkout has uncommitted changes), so "0.1.0"
alone never stands for two different programs.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Optional

from robaudit import __version__
from robaudit.audit.results_schema import results_json_text


def results_digest(results: dict) -> str:
    """sha256 hex digest of the results.json text robaudit writes for `results`."""
    return hashlib.sha256(results_json_text(results).encode("utf-8")).hexdigest()


def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (model files can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit robaudit's own source is at ("abc123def456" or "abc123def456+dirty"),
    or None when it is not a git checkout (an installed wheel) or git is missing."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=5)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None  # robaudit sits inside someone else's repository: not our commit
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def tool_identity() -> dict:
    """{"name": "robaudit", "version": "0.1.0", "commit": "abc123def456" | None}."""
    return {"name": "robaudit", "version": __version__, "commit": git_commit()}
