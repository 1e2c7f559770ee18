"""--method-opt values checked before anything is loaded or written (issue 27).

A per-batch method is built only when training starts, after the data, the teacher and
the teacher's audit; a value of the wrong type (`alpha=abc`, `tau_bounds=[1]`,
`beta_milestones=1.5`) used to end there as an internal error, with the teacher's audit
already on disk. `checked_method_options` runs in `RemediationMethod.check_config` (the
pre-flight check): it gives each value the type of the constructor's default (or, for
options whose default is None, the type its annotation names), refuses sequences given as
a single word, then builds the method once with a stand-in class count so its own range
checks run too (no constructor's check depends on the class count beyond "at least 2").
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from typing import Any, Dict, Tuple

from robaudit.errors import UserError
from robaudit.options import coerce_option

TRIAL_CLASSES = 10   # the stand-in class count of the trial construction

# Examples of the types that an Optional annotation names (for coerce_option's `default`).
_EXAMPLES = {float: 0.0, int: 0, str: "", bool: False}


def _constructor_parameters(cls) -> Dict[str, Tuple[Any, Any]]:
    """{keyword option: (default, resolved annotation)} over the constructors of cls and its bases."""
    found: Dict[str, Tuple[Any, Any]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not resolve: go by the defaults alone
            hints = {}
        for param in inspect.signature(init).parameters.values():
            if param.kind is param.KEYWORD_ONLY and param.name not in found:
                found[param.name] = (param.default, hints.get(param.name))
    return found


def _example_of(annotation) -> Any:
    """An example value of the type an annotation names (Optional[X] -> X's), or None if unknown."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if annotation in _EXAMPLES:
        return _EXAMPLES[annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, collections.abc.Sequence):
        inner = typing.get_args(annotation)
        return (_EXAMPLES.get(inner[0], 0.0),) if inner else (0.0,)
    return None


def _typed(owner: str, key: str, value: Any, default: Any, annotation: Any) -> Any:
    example = default if default is not None and default is not inspect.Parameter.empty \
        else _example_of(annotation)
    if example is None:
        return value
    if isinstance(example, (tuple, list)) and not isinstance(value, (tuple, list)) and value is not None:
        raise UserError(f"{owner}: option {key} must be a list of numbers (e.g. {key}=[1, 2]), got {value!r}")
    return coerce_option(owner, key, value, example, optional=default is None)


def checked_method_options(method_cls, cfg) -> dict:
    """cfg.method_options with typed values, after one trial construction of the method."""
    owner = f"method {method_cls.name!r}"
    parameters = _constructor_parameters(method_cls)
    options = {key: _typed(owner, key, value, *parameters[key]) if key in parameters else value
               for key, value in cfg.method_options.items()}
    try:
        method_cls(TRIAL_CLASSES, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, norm=cfg.norm,
                   seed=cfg.seed, dataset=cfg.dataset, student_arch=cfg.student, **options)
    except UserError:
        raise
    except (TypeError, ValueError, OverflowError) as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in cfg.method_options.items())
        raise UserError(f"{owner} cannot use --method-opt {shown}: {err}") from None
    return options
