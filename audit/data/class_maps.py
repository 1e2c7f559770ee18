"""--class-names and --class-map: reading them and checking them against the dataset's classes.

`read_class_names` renames the dataset's classes (label order); `resolve_class_map` maps
each model output to a dataset class and `column_order` turns that into the column
order the boundary applies (audit/models/adapters.py, step 7).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Sequence

from robaudit.errors import UserError


def read_text(path, flag: str) -> str:
    """A small text file given by a command-line flag; a missing/unreadable file is one line.
    utf-8-sig: files saved by Windows tools often start with a byte-order mark."""
    try:
        with open(os.fspath(path), encoding="utf-8-sig") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{flag} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {flag} {path}: {getattr(err, 'strerror', None) or err}") from None


def parse_class_names(text: str, path) -> List[str]:
    """The names a --class-names file lists (a JSON list, or one per line), unchecked."""
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--class-names {path} is not valid JSON ({err.msg}, line {err.lineno}); "
                            f"give a JSON list of names or one name per line") from None
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise UserError(f"--class-names {path} must be a JSON list of names (strings)")
        return [str(n).strip() for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_class_names(path: str, dataset_classes: Sequence[str]) -> List[str]:
    """Names from FILE (one per line, or a JSON list), in dataset label order."""
    names = parse_class_names(read_text(path, "--class-names"), path)
    count = len(dataset_classes)
    if len(names) != count:
        raise UserError(f"--class-names {path} lists {len(names)} names but the dataset has {count} "
                        f"classes; give one name per class, in dataset label order (0..{count - 1})")
    if any(not n for n in names):
        raise UserError(f"--class-names {path} contains an empty name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"--class-names {path} names {duplicates[0]!r} more than once; names must differ")
    if sorted(names) == sorted(dataset_classes) and list(names) != list(dataset_classes):
        raise UserError(f"--class-names {path} lists the dataset's own class names in another order; "
                        f"--class-names renames the dataset's classes in label order. If the model "
                        f"orders its outputs differently, pass --class-map FILE (model index -> "
                        f"dataset class) instead")
    return names


def _class_index(value: Any, names: Sequence[str], alt_names: Sequence[str], where: str) -> int:
    count = len(names)
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        if 0 <= value < count:
            return value
        raise UserError(f"--class-map {where} maps to class index {value}, outside 0..{count - 1}")
    if isinstance(value, str):
        for table in (names, alt_names):
            if value in table:
                return list(table).index(value)
        if re.fullmatch(r"-?\d+", value.strip()):   # what int() reads: not "²" (isdigit) nor "--1"
            return _class_index(int(value), names, alt_names, where)
    shown = ", ".join(list(names)[:5]) + (", ..." if count > 5 else "")
    raise UserError(f"--class-map {where} maps to {value!r}, which is neither a dataset class index "
                    f"0..{count - 1} nor a class name ({shown})")


def resolve_class_map(spec: Any, dataset_classes: Sequence[str],
                      alt_names: Sequence[str] = (), source: str = "--class-map") -> List[int]:
    """model index -> dataset class index, checked to be a permutation of the dataset's classes.

    spec: a path to a JSON file, or its content: a list (position = model index) or a dict
    {"model index": dataset class}, with dataset classes as indices or names.
    """
    count = len(dataset_classes)
    if isinstance(spec, (str, os.PathLike)):
        source = os.fspath(spec)
        text = read_text(source, "--class-map")
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--class-map {source} is not valid JSON ({err.msg}, line {err.lineno}); "
                            f"give a JSON list of {count} dataset classes in model output order, "
                            f"or a JSON object {{\"model index\": dataset class}}") from None
    what = (f"pass a JSON list of the {count} dataset classes (indices or names) in model output "
            f"order, or an object mapping each model index 0..{count - 1} to a different dataset class")
    if isinstance(spec, Mapping):
        entries = []
        for key, value in spec.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise UserError(f"--class-map {source}: key {key!r} is not a model output index; {what}") from None
            entries.append((index, value))
    elif isinstance(spec, (list, tuple)):
        entries = list(enumerate(spec))
    else:
        raise UserError(f"--class-map {source} holds a {type(spec).__name__}; {what}")
    indices = sorted(i for i, _ in entries)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        extra = sorted(set(indices) - set(range(count)))
        detail = (f"model indices {missing[:5]} are missing" if missing
                  else f"model indices {extra[:5]} are outside 0..{count - 1}" if extra
                  else "a model index appears twice")
        raise UserError(f"--class-map {source} is not a permutation of the dataset's {count} classes: "
                        f"{detail}; {what}")
    mapping = [0] * count
    targets: Dict[int, int] = {}
    for model_index, value in entries:
        k = _class_index(value, dataset_classes, alt_names, f"model index {model_index}")
        if k in targets:
            raise UserError(f"--class-map {source} is not a permutation: model indices {targets[k]} and "
                            f"{model_index} both map to dataset class {dataset_classes[k]!r}; {what}")
        targets[k] = model_index
        mapping[model_index] = k
    return mapping


def column_order(model_to_dataset: Sequence[int]) -> List[int]:
    """Indices that reorder model output columns so that column k is dataset class k."""
    order = [0] * len(model_to_dataset)
    for model_index, k in enumerate(model_to_dataset):
        order[k] = model_index
    return order
