"""Produce a plan's variants: skip what is finished, stage the rest, record manifests.

A variant is finished when its manifest exists, was made with the same parameters, and its files
still have the recorded sizes. Each variant is made in `<out>/.staging/<id>/`, moved into place,
and only then gets its manifest, so a crash at any moment leaves nothing that looks finished.
"""

from __future__ import annotations

import platform
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import QuantizeError
from .formats import Backend, ReleaseContext, get_format
from .manifest import Manifest, file_entries, mismatches, package_versions, read_manifest, write_manifest
from .plan import Plan, Variant

STAGING_DIR = ".staging"
LIBRARIES = ("quantize", "torch", "transformers", "huggingface_hub", "gguf")


@dataclass
class Outcome:
    variant: Variant
    status: str  # "done", "skipped" (already finished) or "failed"
    manifest: Manifest | None = None
    error: str | None = None
    seconds: float = 0.0


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **package_versions(LIBRARIES)}


def is_finished(out_dir: Path, variant: Variant) -> Manifest | None:
    manifest = read_manifest(out_dir, variant.id)
    if manifest is None or manifest.params_digest != variant.digest or mismatches(out_dir, manifest):
        return None
    return manifest


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
    produced = backend.produce(variant, staging)
    missing = [p for p in produced.files if not p.is_file()]
    if not produced.files or missing:
        raise QuantizeError(f"{variant.id}: the backend reported files it did not write")
    placed = _move_into_place(out_dir, variant, staging, produced.files)
    manifest = Manifest(
        variant_id=variant.id, format=variant.format, repo_id=variant.repo_id, branch=variant.branch,
        name=variant.name, subdir=variant.subdir, description=variant.description,
        requested=variant.params, measured=produced.measured, params_digest=variant.digest,
        calibration=produced.calibration or variant.calibration_summary,
        files=file_entries(out_dir, placed), tools=tools,
        timings={**produced.timings, "total": round(time.monotonic() - started, 2)},
        quality=produced.quality, notes=produced.notes)
    write_manifest(out_dir, manifest)
    return manifest


def check_backends(plan: Plan, context: ReleaseContext) -> dict[str, Backend]:
    """Instantiate and check every backend the plan needs, before any work starts."""
    backends = {}
    for fmt in plan.formats:
        backend = backend_class(fmt)(context)
        backend.check(plan.of_format(fmt))
        backends[fmt] = backend
    return backends


def run_plan(plan: Plan, out_dir: Path, log: Callable[[str], None] = print,
             on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Make every variant that is not finished yet; a failed variant doesn't stop the others."""
    out_dir = Path(out_dir).resolve()
    context = ReleaseContext(plan, out_dir, log)
    pending = [v for v in plan.variants if not is_finished(out_dir, v)]
    backends = check_backends(plan.select(names=[v.id for v in pending]), context) if pending else {}
    outcomes = []
    try:
        for variant in plan.variants:
            outcome = _run_variant(variant, backends.get(variant.format), out_dir, log)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    finally:
        for backend in backends.values():
            backend.close()
    return outcomes


def _run_variant(variant: Variant, backend: Backend | None, out_dir: Path, log: Callable[[str], None]) -> Outcome:
    finished = is_finished(out_dir, variant)
    if finished or backend is None:
        return Outcome(variant, "skipped", finished)
    started = time.monotonic()
    log(f"{variant.id}: producing")
    try:
        manifest = produce_one(backend, variant, out_dir, {**library_versions(), **backend.tool_versions()})
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one variant's failure is reported; the others go on
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = traceback.format_exc()
        (out_dir / STAGING_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / STAGING_DIR / f"{variant.id.replace('/', '_')}.error.log").write_text(detail)
        return Outcome(variant, "failed", error=f"{type(exc).__name__}: {message}",
                       seconds=time.monotonic() - started)
    return Outcome(variant, "done", manifest, seconds=time.monotonic() - started)
