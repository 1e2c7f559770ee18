"""timm-style registries: `@REG.register("name")`, `REG.names()`, `REG.create(name, **kw)`.

One registry each for attacks, architectures, datasets and remediation methods, so
adding one is one decorated function or class, and tests parametrise over `names()`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from robaudit.errors import UserError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._help: Dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable:
        def deco(obj):
            key = name.lower()
            if key in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[key] = obj
            doc = help or (obj.__doc__ or "").strip().splitlines()[0:1]
            self._help[key] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests and plugins that register temporarily)."""
        key = name.lower()
        self._entries.pop(key, None)
        self._help.pop(key, None)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        key = name.lower()
        if key not in self._entries:
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[key]

    def create(self, name: str, *args, **kwargs):
        return self.get(name)(*args, **kwargs)

    def describe(self) -> Dict[str, str]:
        return {n: self._help[n] for n in self.names()}
