"""A rich progress bar that exists only when a person is watching stderr.

`prepare` shows one over the bytes of large exports, `eval` one per system while it generates; both
print nothing into logs and pipes, and both start and stop the bar with the work (`with` blocks).
"""

from __future__ import annotations

import sys


class WatchedProgress:
    """Subclasses set `self.bar` (a rich Progress) in __init__ when `watching(enabled)`; else it stays None."""

    bar = None

    @staticmethod
    def watching(enabled: bool) -> bool:
        return enabled and sys.stderr.isatty()

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
