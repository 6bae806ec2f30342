"""The two kinds of failure the tool reports, and their exit codes."""


class QuantizeError(Exception):
    """Base class: a failure with a one-line, user-facing message."""

    exit_code = 1


class BadInput(QuantizeError):
    """The recipe, model or arguments are wrong; nothing was started (exit 2)."""

    exit_code = 2


class WorkFailed(QuantizeError):
    """Something failed while producing or publishing a release (exit 1)."""

    exit_code = 1
