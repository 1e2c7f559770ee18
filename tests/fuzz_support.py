"""Shared pieces of the property-based tests (tests/test_fuzz_*.py, issue 27).

The property every parser of user input must have: it returns a valid value, or it raises
`UserError` (one line, exit 2 at the command line). Anything else (a traceback, "internal
error", a half-written file) is a bug. `outcome` runs a parser and sorts the result into
"ok" / "refused"; any other exception propagates and fails the test, with hypothesis's
shrunk example. Budgets (`BUDGET`) keep every property test together under a minute on
two shared cores; FUZZ_EXAMPLES=N raises them for a longer local hunt.
"""

from __future__ import annotations

import contextlib
import os
import warnings

from hypothesis import HealthCheck, event, settings

from robaudit.errors import UserError

# examples per property test; FUZZ_EXAMPLES overrides (e.g. 2000 for a hunt before a release)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0")) or None


def budget(examples: int):
    """hypothesis settings: `examples` draws (or FUZZ_EXAMPLES), no deadline (shared CPUs), no
    database (the corpus of found cases lives in @example decorators); derandomized, so CI runs
    the same draws every time, except in a FUZZ_EXAMPLES hunt."""
    return settings(max_examples=EXAMPLES or examples, deadline=None, database=None, derandomize=EXAMPLES is None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def outcome(parse, *args, **kwargs):
    """("ok", value) or ("refused", message); any other exception is the bug being hunted."""
    try:
        value = parse(*args, **kwargs)
    except UserError as err:
        event("refused")          # --hypothesis-show-statistics shows how often each branch ran
        message = str(err)
        assert message and "\n" not in message, f"UserError must be one line, got {message!r}"
        assert "internal error" not in message
        return "refused", message
    event("ok")
    return "ok", value


# warnings that never reach a user's terminal as extra lines (Python hides them by default)
QUIET_WARNINGS = (ResourceWarning, DeprecationWarning, PendingDeprecationWarning)


@contextlib.contextmanager
def no_stray_warnings():
    """Fail if the block emits a warning a user would see: it would be a second stderr line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    stray = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, QUIET_WARNINGS)]
    assert not stray, stray


def run_cli(argv) -> tuple:
    """(exit code, stdout, stderr) of robaudit.cli.main(argv) in-process, stderr captured here."""
    import io

    from robaudit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_one_line_refusal(code: int, stderr: str) -> None:
    assert code == 2, f"exit {code}: {stderr}"
    assert stderr.startswith("robaudit: error: ") and stderr.count("\n") == 1, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr
