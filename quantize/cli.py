"""`quantize` command line: parse, call the API, print, exit (0 ok, 1 failure during work, 2 bad input)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, api
from .errors import BadInput, QuantizeError
from .formats import get_format
from .plan import Plan
from .capture import LibraryOutput
from .progress import ReleaseProgress
from .memory import gb
from .quant_types import format_size

WIDTH = None if sys.stdout.isatty() else 120  # rich assumes 80 columns when piped; tables need more
out = Console(highlight=False, width=WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


OFFLOAD_HELP = ("disk: stream the model's layers from disk while GPTQ/AWQ quantize and evaluate, for models "
                "bigger than memory (default: the recipe's compute.offload, none)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantize", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quantize {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="show every variant a recipe would produce, with sizes")
    plan.add_argument("recipe", type=Path)
    plan.add_argument("--model", help="use this local fp16 folder instead of the recipe's source")
    plan.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the recipe's compute.device, auto)")
    plan.add_argument("--offload", metavar="none|disk", help=OFFLOAD_HELP)
    plan.add_argument("--json", action="store_true", help="machine-readable output")

    release = commands.add_parser("release", help="produce (and publish) the whole release")
    release.add_argument("recipe", type=Path)
    release.add_argument("--out", type=Path, help="output folder (default: ./out/<basename>)")
    release.add_argument("--model", help="use this local fp16 folder instead of the recipe's source")
    release.add_argument("--only", type=_csv, help="formats to make, e.g. gptq,gguf")
    release.add_argument("--variants", type=_csv, help="variants to make: ids, branches or GGUF types")
    release.add_argument("--no-publish", action="store_true", help="produce and render cards, don't publish")
    release.add_argument("--dry-run", action="store_true", help="only show the plan")
    release.add_argument("--json", action="store_true", help="print a machine-readable summary")
    release.add_argument("--device", help="where GPTQ/AWQ compute, verify and evaluate: auto, cpu, cuda or cuda:N "
                                          "(default: the recipe's compute.device, auto)")
    release.add_argument("--executor", choices=("local", "ray"), default="local",
                         help="where variants are made: this process (local, default) or tasks on a Ray cluster")
    release.add_argument("--address", help="the Ray cluster (--executor ray; default: RAY_ADDRESS, as Ray defines it)")
    release.add_argument("--task-cpus", type=float, help="CPUs each Ray task asks for (--executor ray; default 1)")
    release.add_argument("--offload", metavar="none|disk", help=OFFLOAD_HELP)
    release.add_argument("-v", "--verbose", action="store_true",
                         help="also stream the libraries' output (it always goes to <out>/.work/logs/)")

    card = commands.add_parser("card", help="render every repo's README.md from the manifests")
    card.add_argument("recipe", type=Path, nargs="?", help="the recipe (not with --from-hub)")
    card.add_argument("--from-hub", metavar="REPO_ID",
                      help="re-render a published repo's card from the Hub and push README.md to every branch")
    card.add_argument("--dry-run", action="store_true",
                      help="show what would change (a diff per card), write or push nothing")
    card.add_argument("--out", type=Path, help="the release's output folder (default: ./out/<basename>)")
    card.add_argument("--model", help="use this local fp16 folder instead of the recipe's source")
    card.add_argument("--planned", action="store_true",
                      help="preview: include variants not produced yet, with estimated sizes")
    doctor = commands.add_parser("doctor", help="show the tools and libraries found, and what is missing")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


@contextlib.contextmanager
def stdout_to_stderr():
    """Keep stdout for our JSON: libraries (GPTQModel's banner and logs) print to it while we work."""
    saved_stdout = sys.stdout
    saved_fd = None
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
        saved_fd = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured in tests)
        saved_fd = None
    sys.stdout = sys.stderr
    try:
        yield saved_stdout
    finally:
        sys.stdout = saved_stdout
        if saved_fd is not None:
            sys.stdout.flush()
            os.dup2(saved_fd, sys.stdout.fileno())
            os.close(saved_fd)


def print_plan(plan: Plan) -> None:
    for fmt, repo_id in plan.repo_ids().items():
        variants = plan.of_format(fmt)
        table = Table(title=f"{repo_id}: {len(variants)} variant(s), {format_size(plan.estimated_total(fmt))}",
                      title_justify="left")
        plugin = get_format(fmt)
        for column in (plugin.location_label, "Method", "Parameters", "Est. size"):
            table.add_column(column, justify="right" if column == "Est. size" else "left")
        for v in variants:
            table.add_row(plugin.location(v), plugin.method(v), plugin.describe(v), format_size(v.estimated_bytes))
        out.print(table)
    sized = [a for a in plan.artifacts.values() if a.estimated_bytes()]
    if sized:
        parts = ", ".join(f"{a.name} {format_size(a.estimated_bytes())}" for a in sized)
        out.print(f"working files ({parts}): {format_size(plan.working_bytes)}")
    out.print(f"disk needed: {format_size(plan.estimated_disk())}")
    peak = plan.peak_memory()
    if peak is not None:
        table = Table(title=f"memory: ~{gb(peak.bytes)} at peak ({peak.stage}; offload: {plan.recipe.compute.offload})",
                      title_justify="left")
        for column in ("Stage", "Peak memory", "Of which"):
            table.add_column(column, justify="right" if column == "Peak memory" else "left")
        for m in plan.memory():
            table.add_row(m.stage, ("~" if not m.mapped else "≤") + gb(m.bytes),
                          ", ".join(f"{name} {gb(size)}" for name, size in m.parts)
                          + ("; llama.cpp memory-maps it: runs in less" if m.mapped else ""))
        out.print(table)
    device = plan.device
    if device is not None:
        out.print(f"device: {device.name} (GPTQ/AWQ quantize in {device.compute_dtype}, evaluate in {device.eval_dtype})")
    for warning in plan.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")


def cmd_plan(args) -> int:
    plan = api.plan(args.recipe, args.model, device=args.device, offload=args.offload)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    return 0


def cmd_release(args) -> int:
    if args.dry_run:  # the plan, after every check a real run makes before its work
        plan = api.check(args.recipe, args.out, args.only, args.variants, args.model, device=args.device,
                         offload=args.offload, **_executor_args(args))
        print(json.dumps(plan.to_dict(), indent=2)) if args.json else print_plan(plan)
        return 0
    with stdout_to_stderr(), LibraryOutput(verbose=args.verbose) as library_output:
        # our progress goes to the terminal as it was; the libraries' output to <out>/.work/logs/
        progress = ReleaseProgress(Console(file=library_output.terminal, highlight=False, soft_wrap=True))
        try:
            result = api.release(args.recipe, args.out, args.only, args.variants, args.model,
                                 publish=not args.no_publish, log=progress.log, on_outcome=progress.outcome,
                                 on_start=progress.start, device=args.device, library_output=library_output,
                                 offload=args.offload, **_executor_args(args))
        finally:
            progress.stop()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_summary(result)
    if result.failed:
        names = ", ".join(o.variant.id for o in result.failed)
        logs = ", ".join(escape(str(o.log)) for o in result.failed if o.log)
        err.print(f"[red]error:[/] {len(result.failed)} variant(s) failed: {names}; the others are kept. "
                  f"Details in {result.out_dir}/.staging/*.error.log" + (f" and the log(s) {logs}" if logs else ""))
        return 1
    return 0


def _executor_args(args) -> dict:
    return {"executor": args.executor, "address": args.address, "task_cpus": args.task_cpus}


def _print_summary(result: api.ReleaseResult) -> None:
    table = Table(title=f"Release in {result.out_dir}")
    for column in ("Variant", "Status", "Size", "PPL", "Time"):
        table.add_column(column)
    for o in result.outcomes:
        m = o.manifest
        ppl = m.quality.get("perplexity") if m else None
        table.add_row(o.variant.id, o.status, format_size(m.total_size) if m else "",
                      f"{ppl:.3f}" if ppl else "", f"{o.seconds:.0f} s" if o.status == "done" else "")
    out.print(table)
    for card in result.cards:
        out.print(f"card: {card.path}")
        for warning in card.warnings:
            err.print(f"[yellow]warning:[/] {escape(warning)}")


def cmd_card(args) -> int:
    if args.from_hub:
        updates = api.regenerate_hub_card(args.from_hub, dry_run=args.dry_run,
                                          log=lambda message: err.print(escape(message)))
        for update in updates:
            if args.dry_run and update.diff:
                out.print(update.diff, markup=False, end="")
            state = "changed" if update.changed else "unchanged"
            err.print(f"{args.from_hub}@{update.branch}: card (README.md, chart) {state}"
                      + (" (dry run: not pushed)" if args.dry_run and update.changed else ""))
        return 0
    if args.recipe is None:
        raise BadInput("card: give a RECIPE, or --from-hub REPO_ID")
    cards = api.cards(args.recipe, args.out, args.model, include_planned=args.planned, dry_run=args.dry_run)
    if not cards:
        err.print("[yellow]warning:[/] no variant has been produced yet: no card rendered "
                  "(run `quantize release` first, or `--planned` for a preview)")
        return 0
    for card in cards:
        if args.dry_run:
            _print_card_diff(card)
        else:
            out.print(f"{card.repo_id}: {card.path}")
        if card.missing and not args.planned:
            err.print(f"[yellow]warning:[/] {card.repo_id}: {len(card.missing)} planned variant(s) not produced "
                      f"yet and left out: {', '.join(card.missing)}")
        for warning in card.warnings:
            err.print(f"[yellow]warning:[/] {escape(warning)}")
    return 0


def _print_card_diff(card) -> None:
    """`card RECIPE --dry-run`: the diff against the card on disk, and what would happen; nothing is written."""
    import difflib

    try:
        current = card.path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        current = None
    diff = "".join(difflib.unified_diff((current or "").splitlines(True), card.text.splitlines(True),
                                        f"{card.path} (on disk)" if current is not None else "/dev/null",
                                        f"{card.path} (new)"))
    if diff:
        out.print(diff, markup=False, end="" if diff.endswith("\n") else "\n")
    state = "new" if current is None else ("changed" if current != card.text else "unchanged")
    err.print(f"{card.repo_id}: {escape(str(card.path))} {state} (dry run: not written)")


def cmd_doctor(args) -> int:
    from . import doctor

    facts = doctor.report()
    missing = doctor.problems(facts)
    if args.json:
        print(json.dumps({**facts, "problems": missing}, indent=2))
        return 1 if missing else 0
    table = Table(title="quantize doctor", title_justify="left")
    for column in ("Component", "Version", "Where / use"):
        table.add_column(column)
    table.add_row("python", facts["python"], "")
    for lib in facts["libraries"]:
        table.add_row(lib["name"], lib["version"] or "[red]missing[/]", lib["needed_for"])
    llama = facts["llama_cpp"]
    for tool in llama["tools"]:
        table.add_row(tool["name"], escape(tool["version"] or "?"), escape(tool["path"]))
    if not llama["found"]:
        table.add_row("llama.cpp", "[red]missing[/]", escape(llama["problem"] or ""))
    table.add_row("wikitext-2", "local" if facts["wikitext"]["local_copy"] else "-",
                  escape(facts["wikitext"]["local_copy"] or f"set {facts['wikitext']['env']}"))
    table.add_row("Hub token", facts["hub"]["token"], escape(facts["hub"]["endpoint"]))
    out.print(table)
    for problem in missing:
        err.print(f"[yellow]missing:[/] {escape(problem)}")
    return 1 if missing else 0


COMMANDS = {"plan": cmd_plan, "release": cmd_release, "card": cmd_card, "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except QuantizeError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[red]interrupted:[/] finished variants are kept; run the same command again to continue")
        return 130
    except Exception as exc:  # an unexpected failure: one line, the details on request
        if os.environ.get("QUANTIZE_DEBUG"):
            traceback.print_exc()
        err.print(f"[red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))} (set QUANTIZE_DEBUG=1 for details)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
