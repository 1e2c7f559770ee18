"""User-facing errors.

Anything a user can cause (bad file, bad flag, wrong class count, ...) raises
`UserError` with ONE line that says what is wrong and what to pass instead. The CLI
prints it to stderr and exits non-zero, without a traceback. Programming errors stay
ordinary exceptions.
"""


class UserError(Exception):
    """A problem with the user's input; `str(err)` is the one line shown to them."""

    exit_code = 2

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)


class GateFailed(UserError):
    """A --fail-under-worst / --fail-over-nsd gate was violated (results are still written)."""

    exit_code = 3
