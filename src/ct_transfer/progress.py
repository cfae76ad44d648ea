"""Progress that shows wherever the work runs: a ``tqdm.auto`` bar on a terminal or in a notebook,
periodic log lines (logger ``ct_transfer.progress``) in scripts, pipes, CI logs and job schedulers,
where a bar is either invisible (tqdm draws nothing without a terminal) or a wall of carriage returns.

The interval between log lines is ``CT_TRANSFER_PROGRESS_SECONDS`` (default 10 s); a line is also
written when a loop starts and when it ends, so even a fast loop says what it did.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("ct_transfer.progress")


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("CT_TRANSFER_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def interactive() -> bool:
    """A terminal on stderr, or a Jupyter kernel (where ``tqdm.auto`` draws a widget)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced or closed
        return False


class Progress:
    """``update(n)`` as work is done; a bar when interactive, else a log line every ``interval()`` s.

    ``note`` (a callable returning text, e.g. the running loss) is only called when a line or the bar's
    postfix is due, so a caller can pass something that syncs a GPU without paying for it per step.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "img", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.every = interval()
        self.bar = None
        self._posted = 0
        if not enabled:
            return
        if interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, mininterval=1.0)
        else:
            log.info("%s: %d %ss", desc, self.total, unit)

    def update(self, n: int = 1, note=None) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if note is not None and (self.n - self._posted >= 256 or self.n >= self.total):
                self.bar.set_postfix_str(note())
                self._posted = self.n
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            extra = f"  {note()}" if note is not None else ""
            log.info("%s: %d/%d %ss (%.0f%%) [%.0fs]%s", self.desc, self.n, self.total, self.unit,
                     100 * self.n / max(1, self.total), now - self.t0, extra)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        else:
            log.info("%s: %d/%d %ss done [%.1fs]", self.desc, self.n, self.total, self.unit,
                     time.perf_counter() - self.t0)
        self.enabled = False  # closing twice says nothing twice

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self.bar is not None:  # an error: no "done" line
            self.bar.close()
        return False


def track(iterable, *, desc: str, total: int | None = None, unit: str = "img", enabled: bool = True,
          size=lambda item: 1):
    """Iterate with progress; ``size(item)`` is how many units one item is (a batch of images)."""
    total = len(iterable) if total is None else total
    with Progress(total, desc, unit=unit, enabled=enabled) as p:
        for item in iterable:
            yield item
            p.update(size(item))
