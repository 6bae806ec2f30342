"""The two kinds of failure the tool reports, and their exit codes."""

from pathlib import Path


class QuantizeError(Exception):
    """Base class: a failure with a one-line, user-facing message."""

    exit_code = 1


class BadInput(QuantizeError):
    """The recipe, model or arguments are wrong; nothing was started (exit 2)."""

    exit_code = 2


class WorkFailed(QuantizeError):
    """Something failed while producing or publishing a release (exit 1)."""

    exit_code = 1


def read_user_text(path: Path, what: str, kind: str = "file") -> str:
    """A text file the user named (recipe, card header, ...), UTF-8 with or without a BOM.

    Every way it can't be read is a one-line BadInput naming `what` and the path.
    """
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise BadInput(f"{what}: {path}: {kind} not found") from None
    except IsADirectoryError:
        raise BadInput(f"{what}: {path} is a folder, not a {kind}") from None
    except OSError as exc:
        raise BadInput(f"{what}: {path}: cannot read the {kind} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"{what}: {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                       f"at offset {exc.start})") from None
