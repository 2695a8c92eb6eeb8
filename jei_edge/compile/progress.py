"""Progress of the long build and verify steps: step messages and, on a terminal, bars with an ETA.

Messages go to the caller's callback (the CLI prints them on stderr; without one they are logged).
Bars (tqdm, on stderr) appear only when a callback is given and stderr is a terminal, so ``--json``
output and logs stay clean; without tqdm (a runtime-only install) there are no bars.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator, Optional

log = logging.getLogger("jei_edge.compile")


class Progress:
    """``progress("message")`` and ``with progress.bar(total, "what") as update: update(rows)``.

    Args:
        say: called with each step message (None: messages are logged at INFO level).
        bars: show bars; None = when ``say`` is given and stderr is a terminal.
    """

    def __init__(self, say: Optional[Callable[[str], None]] = None, bars: Optional[bool] = None):
        self.say = say
        self.bars = (say is not None and sys.stderr.isatty()) if bars is None else bool(bars)

    @classmethod
    def of(cls, progress) -> "Progress":
        """``progress`` itself if it is a Progress, else a Progress around the callback (or None)."""
        return progress if isinstance(progress, Progress) else cls(progress)

    def __call__(self, message: str) -> None:
        if self.say is not None:
            self.say(message)
        else:
            log.info(message)

    @contextlib.contextmanager
    def bar(self, total: int, desc: str, unit: str = "input") -> Iterator[Callable[[int], None]]:
        """A bar of ``total`` units; yields ``update(n)`` (a no-op without bars)."""
        tqdm = None
        if self.bars:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm
        if tqdm is None:
            yield lambda n: None
            return
        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True) as t:
            yield t.update
