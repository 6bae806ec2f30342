"""What `quantize release` shows while it works: rich progress bars on a terminal, plain lines in CI."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .plan import Plan
from .runner import Outcome

STATUS = {"done": "[green]done[/]", "skipped": "[dim]already done[/]", "failed": "[red]FAILED[/]"}


class ReleaseProgress:
    """A bar for the whole release (with ETA) and a line for the variant in hand and its stage."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False, redirect_stdout=False,
                                 redirect_stderr=False) if self.live else None  # capture.py owns the streams
        self.total_task = self.stage_task = None
        self.started = time.monotonic()

    def start(self, plan: Plan) -> None:
        if self.progress is None:
            self.console.print(f"release: {len(plan.variants)} variant(s) in {len(plan.formats)} repo(s)")
            return
        self.progress.start()
        self.total_task = self.progress.add_task("variants", total=len(plan.variants))
        self.stage_task = self.progress.add_task("[dim]starting[/]", total=None)

    def log(self, message: str) -> None:
        if self.progress is None:
            self.console.print(f"[{time.monotonic() - self.started:7.1f}s] {escape(message)}")
        else:
            self.progress.update(self.stage_task, description=f"[dim]{escape(message)}[/]")

    def outcome(self, outcome: Outcome) -> None:
        detail = f" ({escape(outcome.error)}" + (f"; log: {escape(str(outcome.log))}" if outcome.log else "") + ")" \
            if outcome.error else ""
        node = outcome.node or {}
        where = f" on {escape(str(node.get('hostname')))} (node {node['node_id'][:8]})" if node.get("node_id") else ""
        line = f"{outcome.variant.id}: {STATUS[outcome.status]}{where}{detail}"
        if self.progress is None:
            self.console.print(line)
        else:
            self.progress.console.print(line)
            self.progress.advance(self.total_task)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.update(self.stage_task, description="[dim]finished[/]", total=1, completed=1)
            self.progress.stop()
