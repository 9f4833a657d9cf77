"""Progress displays share one context-manager shape: a Rich ``Progress`` on a terminal, plain lines otherwise."""

from __future__ import annotations

from typing import Any, Optional


class BarContext:
    """Enter/exit ``self.bar`` (a ``rich.progress.Progress``) when there is one; subclasses build it."""

    bar: Optional[Any] = None

    def __enter__(self) -> "BarContext":
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.__exit__(*exc)
