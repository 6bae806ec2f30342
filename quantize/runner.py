"""Produce a plan's variants: skip what is finished, stage the rest, record manifests.

A variant is finished when its manifest exists, was made with the same parameters, and its files
still have the recorded sizes and modification times (a file whose time changed is hashed; before
publishing every file is). Each variant is made in `<out>/.staging/<id>/`, moved into place, and
only then gets its manifest, so a crash at any moment leaves nothing that looks finished. One run
at a time per output folder: `output_lock` holds `<out>/.lock`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import BadInput, QuantizeError
from .formats import Backend, ReleaseContext, get_format
from .killpoints import kill_point
from .manifest import (Manifest, file_entries, mismatches, package_versions, read_manifest, refresh_times,
                       write_manifest)
from .memory import bound_heap
from .plan import Plan, Variant
from .quality import gate_problem

STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
LIBRARIES = ("quantize", "torch", "transformers", "huggingface_hub", "gguf")


@dataclass
class Outcome:
    variant: Variant
    status: str  # "done", "skipped" (already finished) or "failed"
    manifest: Manifest | None = None
    error: str | None = None
    seconds: float = 0.0
    log: Path | None = None  # the libraries' output while it was made (<out>/.work/logs/<id>.log)
    node: dict[str, Any] | None = None  # where it was made: hostname (and Ray's node id and IP on a cluster)
    started_at: str | None = None  # UTC, ISO 8601
    finished_at: str | None = None
    published: Any = None  # publish.PublishedBranch, when the task that made it published it (Ray, node-local)


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **package_versions(LIBRARIES)}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def this_node() -> dict[str, Any]:
    return {"hostname": socket.gethostname()}


def is_finished(out_dir: Path, variant: Variant, check_hashes: bool = False) -> Manifest | None:
    """The variant's manifest when it is finished: same fingerprint, files with the recorded size and
    time (or, when a time changed, the recorded sha256; with `check_hashes`, every sha256 checked)."""
    manifest = read_manifest(out_dir, variant.id)
    if manifest is None or manifest.params_digest != variant.digest or mismatches(out_dir, manifest, check_hashes):
        return None
    if any((Path(out_dir) / f.path).stat().st_mtime_ns != f.mtime_ns for f in manifest.files):
        manifest = refresh_times(out_dir, manifest)  # same bytes, new times (a copied folder): remember them
        write_manifest(out_dir, manifest)
    return manifest


@contextlib.contextmanager
def output_lock(out_dir: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold `<out>/.lock` (flock, with our pid in it) for the whole run; BadInput naming the holder's
    pid when another run has it. The kernel drops the lock of a dead process, so a stale one is
    simply taken over."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise BadInput(f"{out_dir}: cannot lock the output folder ({exc.strerror})") from None
        raise BadInput(f"{out_dir}: another quantize run (pid {holder}) is using this output folder; "
                       "wait for it to finish") from None
    previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if previous and previous != str(os.getpid()):
        log(f"{out_dir}: took over the lock of an earlier run (pid {previous}) that did not finish")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    except BadInput:
        if created and {p.name for p in out_dir.iterdir()} <= {LOCK_FILE}:  # refused before any work
            path.unlink(missing_ok=True)
            out_dir.rmdir()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)


def backend_class(fmt: str) -> Callable[[ReleaseContext], Backend]:
    """What makes the backend of a format (tests replace it)."""
    return get_format(fmt).backend


def _move_into_place(out_dir: Path, variant: Variant, staging: Path, files: list[Path]) -> list[Path]:
    """Staged files -> their final place: a variant with a folder of its own replaces it whole."""
    target = out_dir / variant.subdir
    if get_format(variant.format).one_branch_per_variant:
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
        return [target / f.relative_to(staging) for f in files]
    target.mkdir(parents=True, exist_ok=True)
    placed = []
    for path in files:
        final = target / path.relative_to(staging)
        path.rename(final)
        placed.append(final)
    shutil.rmtree(staging, ignore_errors=True)
    return placed


def produce_one(backend: Backend, variant: Variant, out_dir: Path, tools: dict[str, str]) -> Manifest:
    staging = out_dir / STAGING_DIR / variant.id
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    started = time.monotonic()
    bound_heap()
    produced = backend.produce(variant, staging)
    missing = [p for p in produced.files if not p.is_file()]
    if not produced.files or missing:
        raise QuantizeError(f"{variant.id}: the backend reported files it did not write")
    kill_point("produced")
    placed = _move_into_place(out_dir, variant, staging, produced.files)
    kill_point("placed")
    manifest = Manifest(
        variant_id=variant.id, format=variant.format, repo_id=variant.repo_id, branch=variant.branch,
        name=variant.name, subdir=variant.subdir, description=variant.description,
        requested=variant.params, measured=produced.measured, params_digest=variant.digest,
        calibration=produced.calibration or variant.calibration_summary,
        files=file_entries(out_dir, placed), tools=tools,
        timings={**produced.timings, "total": round(time.monotonic() - started, 2)},
        quality=produced.quality, notes=produced.notes)
    write_manifest(out_dir, manifest)
    kill_point("manifest")
    return manifest


def check_backends(plan: Plan, context: ReleaseContext) -> dict[str, Backend]:
    """Instantiate and check every backend the plan needs, before any work starts."""
    backends = {}
    for fmt in plan.formats:
        backend = backend_class(fmt)(context)
        backend.check(plan.of_format(fmt))
        backends[fmt] = backend
    return backends


def finished_variants(plan: Plan, out_dir: Path, log: Callable[[str], None] = print,
                      check_hashes: bool = False) -> dict[str, Manifest | None]:
    """Each variant's manifest when it is finished (see `is_finished`), else None; says which are redone."""
    finished = {v.id: is_finished(out_dir, v, check_hashes) for v in plan.variants}
    for variant in plan.variants:
        if finished[variant.id] is None and read_manifest(out_dir, variant.id) is not None:
            log(f"{variant.id}: its files no longer match its manifest (or its parameters changed): making it again")
    return finished


def run_plan(plan: Plan, out_dir: Path, log: Callable[[str], None] = print,
             on_outcome: Callable[[Outcome], None] | None = None, check_hashes: bool = False,
             output=None) -> list[Outcome]:
    """Make every variant that is not finished yet; a failed variant doesn't stop the others.

    With `check_hashes` (before publishing) a variant counts as finished only when every file's
    sha256 matches its manifest: one that doesn't is made again, never published. With `output`
    (capture.LibraryOutput) the libraries' output goes to `<out>/.work/logs/`: each variant's to
    its own file, set-up and shared work to shared.log.
    """
    out_dir = Path(out_dir).resolve()
    output = output if output is not None else NoCapture()
    context = ReleaseContext(plan, out_dir, log, output=output)
    finished = finished_variants(plan, out_dir, log, check_hashes)
    pending = [v for v in plan.variants if finished[v.id] is None]
    with output.section("shared"):
        backends = check_backends(plan.select(names=[v.id for v in pending]), context) if pending else {}
    outcomes = []
    try:
        for variant in plan.variants:
            outcome = quality_gate(run_variant(variant, finished[variant.id], backends.get(variant.format), out_dir,
                                               log, output), plan.recipe.quality.max_kld)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    finally:
        close_backends(backends, output)
    return outcomes


def close_backends(backends: dict[str, Backend], output) -> None:
    with output.section("shared"):
        for backend in backends.values():
            backend.close()


def quality_gate(outcome: Outcome, max_kld: float) -> Outcome:
    """A made (or finished) variant whose KL divergence is above the recipe's gate fails, its files and
    manifest kept: a rerun with a higher `quality.max_kld` publishes it without making it again."""
    problem = gate_problem(outcome.manifest.quality, max_kld) if outcome.manifest else None
    if problem is None:
        return outcome
    return replace(outcome, status="failed", error=f"{problem} (files kept; not published)")


class NoCapture:
    """The libraries' output stays where it goes (the API's default)."""

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        yield None


def run_variant(variant: Variant, finished: Manifest | None, backend: Backend | None, out_dir: Path,
                log: Callable[[str], None], output=None) -> Outcome:
    """Make one variant (unless finished) with its backend; its failure is an Outcome, not an exception."""
    if finished or backend is None:
        return Outcome(variant, "skipped", finished)
    started, started_at = time.monotonic(), utc_now()
    log(f"{variant.id}: producing")
    with (output or NoCapture()).section(variant.id) as log_file:
        try:
            manifest = produce_one(backend, variant, out_dir, {**library_versions(), **backend.tool_versions()})
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one variant's failure is reported; the others go on
            detail = traceback.format_exc()
            (out_dir / STAGING_DIR).mkdir(parents=True, exist_ok=True)
            (out_dir / STAGING_DIR / f"{variant.id.replace('/', '_')}.error.log").write_text(detail)
            if log_file is not None:
                os.write(2, f"quantize: {variant.id} failed\n{detail}".encode("utf-8", "replace"))
            return Outcome(variant, "failed", error=error_line(exc), seconds=time.monotonic() - started,
                           log=log_file, node=this_node(), started_at=started_at, finished_at=utc_now())
    return Outcome(variant, "done", manifest, seconds=time.monotonic() - started, log=log_file, node=this_node(),
                   started_at=started_at, finished_at=utc_now())


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message`: how a failure is reported."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {message}"
