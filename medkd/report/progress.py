"""Progress display: one class for training (epochs, with a batch bar inside) and ablation (runs).

On a terminal it is a Rich ``Progress`` (an outer bar with an ETA and, optionally, an inner bar whose description
shows live values); elsewhere (a pipe, a log file, ``--quiet``) it prints one plain line per finished step.
Logs go to the console it was given (stderr for every command), above the bars.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from rich.console import Console
from rich.markup import escape


class Bars:
    """An outer bar of ``total`` steps (``done`` finished already), optionally with an inner bar.

    Args:
        console: where bars and lines go.
        label: the outer bar's name (``"teacher epochs"``, ``"ablation"``).
        total, done: steps in all (``None``: not known yet, see :meth:`update`) and already finished.
        unit: shown after the count (``"runs"``); empty for none.
        inner: draw a second bar for the steps inside one outer step (batches of an epoch).
        transient: remove the bars when done (the plain lines printed with :meth:`log` stay).
        nested: the console may already show a live display (a run's epoch bars inside an ablation): use the
            bar only when Rich can nest live displays on this console.
    """

    def __init__(self, console: Console, label: str, total: Optional[int], done: int = 0, unit: str = "",
                 inner: bool = False, transient: bool = True, nested: bool = False):
        self.console, self.total, self.done = console, total, done
        self.bar: Optional[Any] = None
        live = console.is_terminal and not console.quiet and (not nested or hasattr(console, "_live_stack"))
        if live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            cols = [TextColumn("{task.fields[label]}"), BarColumn(), MofNCompleteColumn()]
            if unit:
                cols.append(TextColumn(unit))
            if not transient:
                cols += [TimeElapsedColumn(), TextColumn("ETA")]
            cols += [TimeRemainingColumn(), TextColumn("{task.description}")]
            self.bar = Progress(*cols, console=console, transient=transient)
            self.outer = self.bar.add_task("", total=total, completed=done, label=label)
            self.inner = self.bar.add_task("", total=1, label="") if inner else None

    def __enter__(self) -> "Bars":
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def start(self, label: str, inner_total: Optional[int] = None, announce: bool = False) -> None:
        """A new outer step begins: ``label`` describes it (the inner bar restarts with ``inner_total`` steps).
        With ``announce`` and no bar, a ``[k/n] label`` line is printed."""
        if self.bar:
            if self.inner is not None:
                self.bar.reset(self.inner, total=inner_total or 1, label=label)
            else:
                self.bar.update(self.outer, description=escape(label))
        elif announce:
            self.console.print(f"\\[{self.done + 1}/{self.total}] {escape(label)}", highlight=False, soft_wrap=True)

    def step(self, values: Dict[str, float]) -> None:
        """One inner step finished; ``values`` (e.g. running loss means) are shown beside the inner bar."""
        if self.bar and self.inner is not None:
            self.bar.update(self.inner, advance=1, description=" ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def advance(self, line: Optional[str] = None) -> None:
        """One outer step finished; ``line`` (plain text) is printed above the bars / on its own line."""
        self.done += 1
        if self.bar:
            self.bar.advance(self.outer)
        if line is not None:
            self.log(escape(line))

    def update(self, done: int, total: int, label: str) -> None:
        """``done`` of ``total`` outer steps finished, the last one ``label`` (for callers that report counts)."""
        self.done, self.total = done, total
        if self.bar:
            self.bar.update(self.outer, completed=done, total=total, description=escape(label))
        else:
            self.console.print(f"\\[{done}/{total}] {escape(label)}", highlight=False, soft_wrap=True)

    def log(self, msg: str) -> None:
        """Print a (Rich markup) line above the bars."""
        (self.bar.console if self.bar else self.console).print(msg, highlight=False, soft_wrap=True)
