"""Libraries' output goes to log files, not the terminal: `<out>/.work/logs/<variant id>.log`, and
`shared.log` for set-up, shared artifacts and publishing.

GPTQModel, torch and transformers print from Python, from threads and from C code, log through
`logging` and warn through `warnings`. While a section runs, file descriptors 1 and 2 point at
its log file (os.dup2: this catches all of it), `sys.stdout`/`sys.stderr` write to them, the
libraries' loggers write there, and `warnings` from outside quantize go there too; quantize's own
warnings still reach the terminal. quantize's progress is written to `terminal`, a stream on a
copy of the original stderr made before any redirection. With `verbose`, the libraries' output
is also copied to that terminal stream (a pipe and a thread per section: the log file still gets all).

Sections nest: an artifact computed in the middle of a variant writes to `shared.log`, then the
variant's log takes over again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, TextIO

LOGS_DIR = "logs"  # inside <out>/.work/
SHARED = "shared"
LIBRARY_LOGGERS = ("gptqmodel", "logbar", "transformers", "torch", "torchao", "accelerate", "optimum",
                   "huggingface_hub", "datasets", "safetensors", "tokenizers", "urllib3", "filelock", "gguf")
PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def log_name(name: str) -> str:
    """The log file of a variant id ("gptq/main" -> "gptq/main.log") or of the shared work."""
    return f"{name}.log"


def is_own_warning(filename: str) -> bool:
    """A warning raised from quantize's own code (shown on the terminal); any other is a library's."""
    try:
        return str(Path(filename).resolve()).startswith(PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # C stdio buffers (printf from extensions)
        import ctypes

        ctypes.CDLL(None).fflush(None)


class _FdHandler(logging.Handler):
    """A logging handler writing to whatever file descriptor 2 points at now (the section's target)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(2, (self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:  # never let logging break the work
            self.handleError(record)


class LibraryOutput:
    """Routes the libraries' output of each section of a release to its own log file."""

    def __init__(self, verbose: bool = False, terminal: TextIO | None = None):
        self.verbose = verbose
        self.logs_dir: Path | None = None
        self._stack: list[tuple[int, Path]] = []  # (target fd, log file) of the sections in hand
        self._lock = threading.RLock()
        self._owned_terminal = None
        if terminal is None:
            terminal = self._own_terminal()
        self.terminal = terminal

    def _own_terminal(self) -> TextIO:
        """A stream on a copy of stderr as it is now: where quantize's own output goes while fd 2 is a log."""
        try:
            sys.stderr.flush()
            fd = os.dup(sys.stderr.fileno())
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return sys.stderr  # not a real file (captured in a test): fd 2 is redirected, this isn't
        self._owned_terminal = os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")
        return self._owned_terminal

    def close(self) -> None:
        if self._owned_terminal is not None:
            with contextlib.suppress(OSError):
                self._owned_terminal.close()
            self._owned_terminal = None

    def __enter__(self) -> "LibraryOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, work_dir: Path) -> None:
        """Where the logs go: `<work_dir>/logs/`."""
        self.logs_dir = Path(work_dir) / LOGS_DIR

    def path(self, name: str) -> Path | None:
        return self.logs_dir / log_name(name) if self.logs_dir is not None else None

    def terminal_write(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.terminal.write(text)
            self.terminal.flush()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[Path | None]:
        """While it runs, fds 1 and 2, sys.stdout/stderr, the libraries' loggers and their warnings
        write to the log file of `name`; yields that file (None before `start`: nothing redirected)."""
        path = self.path(name)
        if path is None:
            yield None
            return
        with self._lock:
            if self._stack and self._stack[-1][1] == path:  # already there (an artifact inside the shared section)
                yield path
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(log_fd, f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {name} (pid {os.getpid()})\n".encode())
            tee = _Tee(log_fd, self.terminal) if self.verbose else None
            target = tee.write_fd if tee else log_fd
            first = not self._stack
            _flush_all()
            saved = (os.dup(1), os.dup(2)) if first else None
            os.dup2(target, 1)
            os.dup2(target, 2)
            self._stack.append((target, path))
            if first:
                streams = self._redirect_python()
        try:
            yield path
        finally:
            with self._lock:
                _flush_all()
                self._stack.pop()
                if first:
                    self._restore_python(streams)
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                    os.close(saved[0])
                    os.close(saved[1])
                else:
                    previous = self._stack[-1][0]
                    os.dup2(previous, 1)
                    os.dup2(previous, 2)
                if tee:
                    tee.close()
                os.close(log_fd)

    # Python-level output: streams, loggers, warnings (set up once, for the outermost section)
    def _redirect_python(self):
        saved_streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        handler = _FdHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        saved_loggers = []
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            saved_loggers.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers = [handler]
            logger.propagate = False
        saved_lastresort = logging.lastResort
        logging.lastResort = handler  # loggers without handlers of their own (warnings and up)
        saved_showwarning = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            text = warnings.formatwarning(message, category, filename, lineno, line)
            if is_own_warning(filename) and not self.verbose:  # quantize's own: the user should see it
                self.terminal_write(text)  # (verbose: fd 2 is copied to the terminal anyway)
            with contextlib.suppress(OSError):
                os.write(2, text.encode("utf-8", "replace"))

        warnings.showwarning = showwarning
        return saved_streams, saved_loggers, saved_lastresort, saved_showwarning

    @staticmethod
    def _restore_python(saved) -> None:
        saved_streams, saved_loggers, saved_lastresort, saved_showwarning = saved
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
                stream.close()
        sys.stdout, sys.stderr = saved_streams
        for logger, handlers, propagate in saved_loggers:
            logger.handlers = handlers
            logger.propagate = propagate
        logging.lastResort = saved_lastresort
        warnings.showwarning = saved_showwarning


class _Tee:
    """A pipe whose reader thread copies everything to the log file and to the terminal stream."""

    def __init__(self, log_fd: int, terminal: TextIO):
        self.read_fd, self.write_fd = os.pipe()
        self.log_fd = log_fd
        self.terminal = terminal
        self.thread = threading.Thread(target=self._copy, name="quantize-log-tee", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        terminal_fd = None
        with contextlib.suppress(Exception):
            terminal_fd = self.terminal.fileno()
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            with contextlib.suppress(OSError):
                os.write(self.log_fd, chunk)
            with contextlib.suppress(Exception):
                if terminal_fd is not None:
                    os.write(terminal_fd, chunk)
                else:
                    self.terminal.write(chunk.decode("utf-8", "replace"))
                    self.terminal.flush()
        os.close(self.read_fd)

    def close(self) -> None:
        """Called once fds 1 and 2 no longer point at the pipe: its last writer goes, the thread drains it."""
        os.close(self.write_fd)
        self.thread.join(timeout=30)
