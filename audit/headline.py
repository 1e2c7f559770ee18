"""The one headline rule: which summary block of a results document "the" result is.

The CLI's table and before/after line, the report's verdict, the gates and the library's
`Audit.headline` all lead with the block `headline_key` names:
1. the ensemble (per point, the worst case over every attack run) when present;
2. else the strongest single attack (lowest average accuracy; a block without a finite
   average counts as weakest), which only hand-made or partial documents reach, because
   the engine writes an ensemble whenever a non-clean attack ran;
3. else clean.
"""

from __future__ import annotations

import math
from typing import Optional

CLEAN_KEY = "clean"
ENSEMBLE_KEY = "ensemble"


def _finite(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def headline_key(results: dict) -> str:
    """The name of the block the verdict leads with ("ensemble", an attack, or "clean")."""
    if results.get(ENSEMBLE_KEY):
        return ENSEMBLE_KEY
    attacked = [(name, rec) for name, rec in results["attacks"].items() if name not in (CLEAN_KEY, ENSEMBLE_KEY)]
    if attacked:
        return min(attacked, key=lambda item: (_finite(item[1].get("avg")) is None,
                                               _finite(item[1].get("avg")) or 0.0))[0]
    return CLEAN_KEY


def summary_block(results: dict, key: str) -> Optional[dict]:
    """The block named `key` ("ensemble" or an attack), or None when it did not run."""
    if key == ENSEMBLE_KEY:
        return results.get(ENSEMBLE_KEY) or None
    return results["attacks"].get(key)


def headline_block(results: dict) -> tuple[str, Optional[dict]]:
    """(key, block) of the headline; block is None when nothing at all ran."""
    key = headline_key(results)
    return key, summary_block(results, key)
