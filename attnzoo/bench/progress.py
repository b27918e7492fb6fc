"""Progress of a sweep: a tqdm bar on a terminal when tqdm is installed, plain numbered lines otherwise.

Messages (skips, failures) go through `note` so that they do not break the bar.
"""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, *, stream=None):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self._bar = self._make_bar(total)

    def _make_bar(self, total: int):
        if not self.stream.isatty():  # logs and pipes get plain lines, not carriage-return redraws
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, file=self.stream, unit="run", dynamic_ncols=True, leave=False)

    def advance(self, label: str, steps: int = 1) -> None:
        self.done += steps
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(steps)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
