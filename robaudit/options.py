"""One way to turn a user-given option value into the type its default has.

Attack parameters (`--attack-opt pgd.steps=50`) and method options (`--method-opt
warmup=5`) arrive as strings or JSON values; every registered component declares its
options with typed defaults, and `coerce_option` gives each value that type, or ends
with one line naming the owner, the option and what it must be.
"""

from __future__ import annotations

import math
from typing import Any

from robaudit.errors import UserError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def coerce_option(owner: str, key: str, value: Any, default: Any, *, optional: bool = False) -> Any:
    """`value` converted to the type of `default`.

    owner names the component in the error (e.g. "attack 'pgd'", "method 'ferd'").
    optional=True lets None through (options whose default is None: then `default` is an
    example of the type, e.g. 0 for an optional int). Tuples and lists take the element
    type of the default's entries (int when they are all ints, else float).
    """
    if value is None and optional:
        return None
    if isinstance(default, bool):
        return _to_bool(owner, key, value)
    try:
        if isinstance(default, (tuple, list)):
            kind = int if default and all(isinstance(v, int) for v in default) else float
            return tuple(_to_number(kind, v) for v in value)
        if isinstance(default, (int, float)):
            return _to_number(type(default), value)
    except (TypeError, ValueError, OverflowError):
        kind = "a list of numbers" if isinstance(default, (tuple, list)) else f"a {type(default).__name__}"
        raise UserError(f"{owner}: option {key} must be {kind}, got {value!r}") from None
    if isinstance(default, str):
        return str(value)
    return value


def _to_bool(owner: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise UserError(f"{owner}: option {key} must be true or false, got {value!r}")


def _to_number(kind: type, value: Any):
    if isinstance(value, bool):
        raise ValueError("a flag is not a number")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return int(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not finite")
    return number
