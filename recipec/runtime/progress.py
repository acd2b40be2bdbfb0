"""What a run shows while it works: a bar per step on a terminal, plain lines elsewhere, a summary.

`RichProgress` (stderr is a terminal): one rich bar per step with records done, rate and ETA.
`PlainProgress` (logs, CI, pipes): a line when a step starts and ends, and one every ten seconds
in between. `Quiet` shows nothing. Each step gets a `StepProgress`, which is what operations see as
`ctx.progress`: an op that reports its own progress (`advance`, `total`) drives the bar; for one
that does not, the executor advances it by the records each chunk consumed.

rich is imported only for a terminal, so a run in a pipe (the benchmark) does not pay for it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

if TYPE_CHECKING:
    from recipec.plan import Step
    from recipec.runtime.executor import StepOutcome


class StepProgress:
    """Progress of one step, fed by the op (`advance`, `total`) or else by the executor per chunk."""

    def __init__(self, update: Callable[..., None], total: int | None = None):
        self._update = update
        self.done = 0
        self.expected = total
        self.tokens = 0  # model tokens in and out so far (model steps count requests, not records)
        self.driven = False  # the op reports its own progress

    def advance(self, n: int, tokens: int = 0) -> None:
        self.driven = True
        self.done += n
        self.tokens += tokens
        self._update(self.done, self.expected, self.tokens)

    def total(self, n: int | None) -> None:
        self.driven = True
        self.expected = n
        self._update(self.done, self.expected, self.tokens)

    def chunk_consumed(self, n: int) -> None:
        if not self.driven:
            self.done += n
            self._update(self.done, self.expected, self.tokens)


class RunProgress:
    """The interface, showing nothing."""

    def start(self, count: int) -> None:
        self.count = count

    def step_started(self, step: "Step", position: int, total: int | None) -> StepProgress:
        return StepProgress(lambda done, expected, tokens=0: None, total)

    def step_finished(self, position: int, outcome: "StepOutcome", progress: StepProgress | None = None) -> None:
        """`progress` is what `step_started` returned; None for a cached step, which never started."""

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


Quiet = RunProgress


def _counts(outcome: "StepOutcome") -> str:
    dropped = sum(outcome.dropped.values())
    return f"{outcome.records_in:,} in, {outcome.records_out:,} out, {dropped:,} dropped"


class PlainProgress(RunProgress):
    INTERVAL = 10.0

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.count = 0

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def step_started(self, step: "Step", position: int, total: int | None) -> StepProgress:
        prefix = f"[{position}/{self.count}] {step.id}"
        size = f": {total:,} records" if total is not None else ""
        self._print(f"{prefix} ({step.op}) running{size}")
        started = last = time.monotonic()

        def update(done: int, expected: int | None, tokens: int = 0) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < self.INTERVAL:
                return
            last = now
            elapsed = max(now - started, 1e-9)
            rate = done / elapsed
            eta = f", ETA {_duration((expected - done) / rate)}" if expected and rate > 0 and done <= expected else ""
            of = f"/{expected:,}" if expected is not None else ""
            what = f"requests, {rate:,.1f}/s, {tokens / elapsed:,.0f} tokens/s" if tokens else f"records, {rate:,.0f}/s"
            self._print(f"{prefix}: {done:,}{of} {what}{eta}")

        return StepProgress(update, total)

    def step_finished(self, position: int, outcome: "StepOutcome", progress: StepProgress | None = None) -> None:
        how = "cached" if outcome.cached else f"done in {outcome.seconds:.2f} s"
        self._print(f"[{position}/{self.count}] {outcome.id} ({outcome.op}) {how}: {_counts(outcome)}")

    def message(self, text: str) -> None:
        self._print(text)


class RichProgress(RunProgress):
    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                tokens = task.fields.get("tokens", 0)
                if tokens and speed:  # a model step: requests and tokens per second
                    per_token = tokens / max(task.elapsed or 1e-9, 1e-9)
                    return Text(f"{speed:,.1f} req/s {per_token:,.0f} tok/s", style="progress.data.speed")
                return Text(f"{speed:,.0f} rec/s" if speed else "", style="progress.data.speed")

        self.console = Console(file=stream or sys.stderr)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self.count = 0
        self._tasks: dict[int, Any] = {}
        self._started = False

    def start(self, count: int) -> None:
        self.count = count
        self.bars.start()
        self._started = True

    def step_started(self, step: "Step", position: int, total: int | None) -> StepProgress:
        task = self.bars.add_task(f"[{position}/{self.count}] {step.id}", total=total)

        def update(done: int, expected: int | None, tokens: int = 0) -> None:
            self.bars.update(task, completed=done, total=expected, tokens=tokens)

        progress = StepProgress(update, total)
        self._tasks[id(progress)] = task
        return progress

    def step_finished(self, position: int, outcome: "StepOutcome", progress: StepProgress | None = None) -> None:
        mark = "[dim]cached[/dim]" if outcome.cached else "[green]done[/green]"
        description = f"[{position}/{self.count}] {outcome.id} {mark}"
        size = outcome.records_in or 1  # a full bar, also for a step with no input
        if progress is None:
            self.bars.add_task(description, total=size, completed=size)
        else:
            self.bars.update(self._tasks.pop(id(progress)), description=description, total=size, completed=size)

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self._started:
            self.bars.stop()
            self._started = False


def make_progress(*, quiet: bool = False, stream: TextIO | None = None) -> RunProgress:
    stream = stream or sys.stderr
    if quiet:
        return Quiet()
    if stream.isatty():
        return RichProgress(stream)
    return PlainProgress(stream)


class ProgressLogHandler(logging.Handler):
    """Shows warnings from the run (ops' included) through the progress display, not around it.

    Tracebacks stay in the log file, and so do the executor's own error records: the command
    reports a failed step itself, once.
    """

    def __init__(self, progress: RunProgress, level: int = logging.WARNING):
        super().__init__(level)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "recipec.run" and record.levelno >= logging.ERROR:
            return
        try:
            self.progress.message(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a display problem must not fail the run
            self.handleError(record)


# ---- the summary table --------------------------------------------------------------------------

COLUMNS = ("step", "op", "in", "out", "dropped", "cached", "seconds")


def summary_rows(outcomes: Sequence["StepOutcome"]) -> list[tuple[str, ...]]:
    return [(o.id, o.op, f"{o.records_in:,}", f"{o.records_out:,}", f"{sum(o.dropped.values()):,}",
             "yes" if o.cached else "no", f"{o.seconds:.2f}") for o in outcomes]


def summary_text(outcomes: Sequence["StepOutcome"]) -> str:
    rows = [COLUMNS, *summary_rows(outcomes)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    left = {0, 1, 5}  # text columns; numbers align right
    lines = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def print_summary(outcomes: Sequence["StepOutcome"], stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    if not stream.isatty():
        print(summary_text(outcomes), file=stream)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="recipec run")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i in (0, 1, 5) else "right", overflow="fold")
    for row in summary_rows(outcomes):
        table.add_row(*row)
    Console(file=stream).print(table)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
