"""Path redaction for `robaudit report --redact-paths`: filesystem paths cut to basenames.

A report is often shared outside the machine that produced it, and results.json
records where the model, the data and the teacher lived. `redact_results` returns a
copy in which those paths, path tokens of the command line and absolute paths inside
free text (check messages, notes, options) keep only their last component. The
report renders from that copy, so the embedded results JSON is redacted too.
"""

from __future__ import annotations

import copy
import re
from typing import Any

# An absolute path inside free text: rooted at "/", "\", "~/" or a drive letter, and not
# glued to a preceding word, number or URL scheme (so "8/255" and "https://" survive).
_PATH_IN_TEXT = re.compile(
    r"(?<![\w.:/\\~-])(?:[A-Za-z]:|~)?[\\/][^\s\\/'\"<>|,;()\[\]]+(?:[\\/][^\s\\/'\"<>|,;()\[\]]*)*"
)
_FRACTION = re.compile(r"^\d+(?:\.\d+)?/\d+(?:\.\d+)?$")
REDACTED = "[redacted]"


def basename(path: str) -> str:
    """The last component of a / or \\ separated path ("[redacted]" when it has none)."""
    parts = [part for part in re.split(r"[\\/]", path) if part]
    return parts[-1] if parts else REDACTED


def redact_text(text: str) -> str:
    """Free text with every absolute path in it cut to its basename."""
    return _PATH_IN_TEXT.sub(lambda match: basename(match.group(0)), text)


def redact_command(command: str) -> str:
    """Every argv token that is a path (relative ones too) becomes its basename."""

    def token(match: re.Match) -> str:
        word = match.group(0)
        prefix = ""
        if word.startswith("-") and "=" in word:
            prefix, word = word.split("=", 1)
            prefix += "="
        quote = word[0] if word[:1] in ("'", '"') and word.endswith(word[0]) and len(word) > 1 else ""
        bare = word[1:-1] if quote else word
        if ("/" in bare or "\\" in bare) and not _FRACTION.match(bare):
            bare = basename(bare)
        return f"{prefix}{quote}{bare}{quote}"

    # A token runs to unquoted whitespace, so a quoted path with spaces stays one token.
    return re.sub(r"(?:\"[^\"]*\"|'[^']*'|\S)+", token, command)


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [_redact_strings(item) for item in value]
    if isinstance(value, dict):
        return {key: _redact_strings(item) for key, item in value.items()}
    return value


# Free text that may quote a path. Class names, attack blocks and example images are
# left alone: a class may legitimately be called "/m/01g317", and base64 contains "/".
_REDACTED_SECTIONS = ("model", "config", "checks", "notes", "environment", "training", "tool")


def redact_results(results: dict) -> dict:
    """A copy of `results` with filesystem paths cut to their basename.

    model.path, dataset.source and training.teacher lose their directories even when
    relative; so do command tokens that are paths; any absolute path inside free text
    (check messages, notes, adaptations, options) is cut as well.
    """
    redacted = copy.deepcopy(results)
    for section in _REDACTED_SECTIONS:
        if section in redacted:
            redacted[section] = _redact_strings(redacted[section])
    dataset = redacted.get("dataset")
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            if key != "classes":
                dataset[key] = _redact_strings(value)
    for section, key in (("model", "path"), ("dataset", "source"), ("training", "teacher")):
        holder = redacted.get(section)
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and re.search(r"[\\/]", holder[key]):
            holder[key] = basename(holder[key])
    if isinstance(redacted.get("command"), str):
        redacted["command"] = redact_command(redacted["command"])
    return redacted
