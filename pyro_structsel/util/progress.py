"""Progress bars that suit where the output goes: a live bar on a terminal, one line elsewhere.

On a terminal :func:`progress_bar` is a ``tqdm`` bar. When standard error is
a file or a pipe (CI logs, ``| tee``), tqdm's carriage returns turn every
refresh into a line of its own; there the bar stays silent while it runs and
writes **one** line when it closes: what ran, how far, how long, and its last
figures (``select_structure: 500/500 steps in 6.1 s, elbo=-1234``).
``enabled=False`` writes nothing at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm


class LineProgress:
    """The off-terminal bar: counts steps and writes one summary line on :meth:`close`.

    Has the part of tqdm's interface the library uses (``update``,
    ``set_postfix``, ``close``, iteration, context manager).
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 initial: int = 0, desc: str = "", unit: str = "steps",
                 file: TextIO | None = None) -> None:
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.n = initial
        self.initial = initial
        self.desc = desc
        self.unit = unit
        self.file = file
        self.postfix: dict[str, Any] = {}
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable if self.iterable is not None else ():
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)

    def line(self) -> str:
        """The summary line, as :meth:`close` writes it."""
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        text = f"{self.desc}: {done} {self.unit} in {time.perf_counter() - self.start:.1f} s"
        if self.initial:
            text += f" (resumed at {self.initial})"
        if self.postfix:
            text += ", " + ", ".join(f"{key}={value}" for key, value in self.postfix.items())
        return text

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n > self.initial:  # a bar that ran nothing (resumed at the end) says nothing
            print(self.line(), file=self.file or sys.stderr, flush=True)


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 initial: int = 0, desc: str = "", enabled: bool = True,
                 unit: str = "steps") -> Any:
    """A progress bar over ``iterable`` (or ``total`` steps counted with ``update``).

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over; ``None`` for a bar driven by ``update(n)``.
    total, initial : int, optional
        Number of steps, and the step to start from (a resumed fit).
    desc : str
        The name the bar or the line starts with.
    enabled : bool
        ``False``: nothing is written (``progress=False`` of the public API).
    unit : str
        What is counted, for the off-terminal line.

    Returns
    -------
    tqdm or LineProgress
        A ``tqdm`` bar when standard error is a terminal, else a
        :class:`LineProgress` that writes one line when closed.
    """
    if enabled and not _is_terminal(sys.stderr):
        return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit)
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not enabled,
                mininterval=0.5, leave=False)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
