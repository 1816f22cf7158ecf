"""What `kflift run` shows while it runs, and where everything else goes.

One line per stage (waiting, running, cached, done, failed) with its elapsed time and key figure, a
progress bar for augment (images) and for each training run (epochs, with the epoch's metrics), then
the comparison of the candidates and where to look. The stages' own output (kfp.local's executor
dumps, TensorFlow's and Beam's logs) goes to runs/<run id>/run.log only; `verbose` streams it to the
console too. The display follows the progress lines the stages print (components/progress.py), read
from the stream that fills run.log.

On a terminal the stage lines redraw in place (rich); anywhere else (a pipe, CI, a test) and with
`verbose`, each state change is one plain line: no carriage returns, a few dozen lines a run.
"""
from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..components.progress import parse

ICONS = {"waiting": "·", "running": "▸", "cached": "≡", "done": "✓", "failed": "✗"}
STYLES = {"waiting": "dim", "running": "yellow", "cached": "cyan", "done": "green", "failed": "bold red"}
SHORT = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc"}


@dataclass
class Stage:
    """One stage as the console knows it from the progress lines."""
    name: str
    state: str = "waiting"
    since: float | None = None  # when its process started (epoch seconds)
    seconds: float | None = None  # its wall time, once it ended
    metrics: dict = field(default_factory=dict)
    champion: str | None = None
    error: str = ""
    images: int | None = None  # augment: how many images it checks
    counts: dict = field(default_factory=dict)  # augment: (worker, "checked"|"written") -> count so far
    epoch: int = 0
    epochs: int = 0
    phase: str = ""
    fit: dict = field(default_factory=dict)  # the last epoch's metrics

    def count(self, what: str) -> int:
        """All workers' count (over a copy: rich's refresh thread reads it while events come in)."""
        return sum(n for (_, key), n in list(self.counts.items()) if key == what)

    def elapsed(self, now: float) -> float | None:
        if self.seconds is not None:
            return self.seconds
        return now - self.since if self.since and self.state == "running" else None


def figure(stage: Stage) -> str:
    """The one number that says what a finished stage did."""
    m = stage.metrics
    if "written.total" in m:
        return f"{int(m['written.total']):,} images written"
    if stage.champion or stage.name == "evaluate":
        if stage.champion and f"{stage.champion}.accuracy" in m:
            return f"winner {stage.champion}, test accuracy {m[f'{stage.champion}.accuracy']:.3f}"
        return "no winner (no candidate passed the gate)" if m else ""
    for key, label in (("final_val_accuracy", "val accuracy"), ("best_val_accuracy", "best val accuracy"),
                       ("final_accuracy", "train accuracy")):
        if key in m:
            return f"{label} {m[key]:.3f}"
    if "parameters" in m:
        return f"{int(m['parameters']):,} parameters"
    return ""


def activity(stage: Stage) -> str:
    """What a running stage is doing now (beside its bar)."""
    if stage.images is not None:
        written = stage.count("written")
        return f"{stage.count('checked'):,}/{stage.images:,} images checked" + (f", {written:,} written"
                                                                                if written else "")
    if stage.epochs:
        fit = " ".join(f"{short} {stage.fit[k]:.3f}" for k, short in SHORT.items() if k in stage.fit)
        return " ".join(p for p in (stage.phase, f"epoch {stage.epoch}/{stage.epochs}", fit) if p)
    return ""


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def plain_line(stage: Stage) -> str:
    """The plain line of a state change."""
    if stage.state == "running":
        return f"{stage.name}: running"
    if stage.state == "failed":
        after = f" after {seconds_text(stage.seconds)}" if stage.seconds is not None else ""
        return f"{stage.name}: failed{after}" + (f": {stage.error}" if stage.error else "")
    what = figure(stage)
    return f"{stage.name}: {stage.state} in {seconds_text(stage.seconds)}" + (f", {what}" if what else "")


class Board:
    """Every stage's state, from the planned list and the progress events."""

    def __init__(self, planned: list[str] = ()):
        self.stages = {name: Stage(name) for name in planned}

    def stage(self, name: str) -> Stage:
        return self.stages.setdefault(name, Stage(name))

    def apply(self, event: dict, now: float) -> list[str]:
        """Take one progress event; returns the plain lines it makes (state changes and notes)."""
        s = self.stage(event["stage"])
        lines = [f"{s.name}: {event['note']}"] if event.get("note") else []
        state = event.get("state")
        if state == "running":
            s.state, s.since, s.seconds = state, event.get("since") or now, None
            lines.append(plain_line(s))
        elif state in ("done", "cached", "failed"):
            s.seconds = event["seconds"] if "seconds" in event else s.elapsed(now)
            s.state = state
            s.metrics = event.get("metrics") or {}
            s.champion = event.get("champion")
            s.error = event.get("error", "")
            lines.append(plain_line(s))
        for what in ("checked", "written"):
            if what in event:
                s.counts[(event.get("worker", ""), what)] = int(event[what])
        if "images" in event:
            s.images = int(event["images"])
        if "epoch" in event:
            s.epoch, s.epochs = int(event["epoch"]), int(event.get("epochs", s.epochs))
            s.phase, s.fit = event.get("phase", ""), event.get("metrics") or {}
        return lines

    def end(self, ok: bool, now: float) -> list[str]:
        """The run is over: a stage still running when it failed has failed (its process died
        before it could say so)."""
        lines = []
        for s in self.stages.values():
            if s.state == "running" and not ok:
                s.state, s.seconds = "failed", s.elapsed(now)
                s.error = s.error or "its process ended without a result (see the log)"
                lines.append(plain_line(s))
        return lines


class _Sink(io.TextIOBase):
    """sys.stdout and sys.stderr while a run is captured: every write goes to the console."""

    def __init__(self, console: "RunConsole"):
        self.console = console

    def write(self, text: str) -> int:
        self.console.write(text)
        return len(text)

    def flush(self) -> None:
        pass


class RunConsole:
    """The console of one `kflift run`: `capture()` takes over this process's output (run.log gets
    all of it, once `log_to` names the file), `say` prints a line of its own, `plan` lists the
    stages, `report` prints the comparison and where to look.

    `live`: redraw in place (default: when `out` is a terminal and not `verbose`)."""

    def __init__(self, out=None, verbose: bool = False, live: bool | None = None):
        self.out = out or sys.stdout
        self.verbose = verbose
        if live is None:
            live = not verbose and hasattr(self.out, "isatty") and self.out.isatty()
        self.live = live
        self.board = Board()
        self._lock = threading.RLock()
        self._log = None
        self._pending: list[str] = []  # what was written before the log file was named
        self._partial = ""
        self._capturing = self._ended = False
        self._rich = self._live = None
        self._spinners: dict = {}
        if live:
            from rich.console import Console

            self._rich = Console(file=self.out, highlight=False, emoji=False)

    # -- what the run says itself
    def say(self, text: str = "") -> None:
        """A line of the console's own (also into the log)."""
        with self._lock:
            self._to_log(text + "\n")
            if self._rich is not None:
                self._rich.print(text, markup=False, soft_wrap=True)  # a long path stays one line
            else:
                self.out.write(text + "\n")
                self.out.flush()

    def plan(self, stages: list[str]) -> None:
        """The stages this run will go through, in order: each shown waiting until it starts."""
        with self._lock:
            for name in stages:
                self.board.stage(name)
            if self._rich is not None:
                from rich.live import Live

                self._live = Live(console=self._rich, get_renderable=self._table, refresh_per_second=4,
                                  redirect_stdout=False, redirect_stderr=False, transient=False)
                self._live.start()
            else:
                self._print(f"stages: {', '.join(stages)}")

    def log_to(self, path: Path) -> None:
        """From now on the captured output goes to this file (with what came before)."""
        with self._lock:
            self._log = path.open("a")
            self._log.write("".join(self._pending))
            self._log.flush()
            self._pending = []

    # -- the captured stream
    @contextlib.contextmanager
    def capture(self):
        """This process's stdout and stderr (kfp.local prints every stage's output lines into it)
        go to the log; progress lines move the display; with `verbose` the rest is shown too."""
        sink = _Sink(self)
        self._capturing = True
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield self
        except BaseException:
            self._end(ok=False)
            raise
        self._end(ok=True)

    def write(self, text: str) -> None:
        with self._lock:
            if not self._capturing:  # a stray handler that kept our sink after the run
                sys.__stderr__.write(text)
                return
            self._to_log(text)
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._line(line)

    def _to_log(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text)
            self._log.flush()  # the log is whole up to the moment of a kill
        elif not self._ended:
            self._pending.append(text)

    def _line(self, line: str) -> None:
        event = parse(line)
        if event is None:
            if self.verbose:
                self._print(line)
            return
        for text in self.board.apply(event, time.time()):
            if self._live is None:
                self._print(text)

    def _print(self, text: str) -> None:
        if self._rich is not None:
            self._rich.print(text, markup=False, soft_wrap=True)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def _end(self, ok: bool) -> None:
        with self._lock:
            if self._partial:
                self._line(self._partial)
                self._partial = ""
            self._capturing, self._ended = False, True
            for text in self.board.end(ok, time.time()):
                if self._live is None:
                    self._print(text)
            if self._live is not None:
                self._live.stop()  # leaves the final state on the screen
                self._live = None
            if self._log is not None:
                self._log.close()
                self._log = None
            elif self._pending and not ok:  # no run folder to hold it: show it rather than lose it
                sys.__stderr__.write("".join(self._pending))
            self._pending = []

    # -- the live table
    def _table(self):
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        now = time.time()
        table = Table.grid(padding=(0, 1))
        for _ in range(5):
            table.add_column(no_wrap=True)
        table.add_column(no_wrap=True, overflow="ellipsis")
        width = max((len(n) for n in self.board.stages), default=8)
        for s in list(self.board.stages.values()):
            style = STYLES[s.state]
            icon = Text(ICONS[s.state], style=style)
            if s.state == "running":
                icon = self._spinners.setdefault(s.name, Spinner("dots", style=style))
            bar, detail = Text(""), Text("")
            if s.state == "running":
                total, done = (s.images, s.count("checked")) if s.images else (s.epochs, s.epoch)
                if total:
                    bar = ProgressBar(total=total, completed=min(done, total), width=20)
                detail = Text(activity(s))
            elif s.state == "failed":
                detail = Text(s.error, style=style)
            elif s.state in ("done", "cached"):
                detail = Text(figure(s))
            table.add_row(icon, Text(s.name.ljust(width)), Text(s.state.ljust(7), style=style),
                          Text(seconds_text(s.elapsed(now)).rjust(6)), bar, detail)
        return table

    # -- after the run
    def report(self, summary: dict, output: Path) -> None:
        """The comparison table, the winner and where to look."""
        comparison = Path(summary.get("comparison") or "")
        if comparison.is_file():
            self.say()
            if self._rich is not None:
                from rich.markdown import Markdown

                self._rich.print(Markdown(comparison.read_text()))
            else:
                self.say(comparison.read_text().rstrip("\n"))
        best = summary["candidates"].get(summary["winner"] or "", {})
        self.say(f"\nwinner: {summary['winner']} ({', '.join(f'{k}={v:.3f}' for k, v in best.items())})")
        if summary["cached"]:
            self.say(f"cached stages: {', '.join(summary['cached'])}")
        self.say(f"summary: {summary['path']}")
        if summary.get("log"):
            self.say(f"log: {summary['log']}")
        if summary["serving"]:
            self.say(f"serving model: {summary['serving']}  (kflift predict --model {summary['serving']} IMAGE...)")
            where = "" if summary["tracking_uri"].startswith("sqlite:") else f" --tracking-uri {summary['tracking_uri']}"
            self.say(f"scoring server for the registered champion: kflift serve --output {output}{where}")
        if summary["tracking_uri"].startswith("sqlite:"):
            self.say(f"MLflow: kflift ui --output {output}  (or `make ui`), then open http://127.0.0.1:5000")
        else:
            self.say(f"MLflow: {summary['tracking_uri']}")
