"""Progress of a Story-Iter run: one tqdm bar over every frame still to draw (its ETA is the
run's), described by the current round; the denoising-step bar sits under it.

When stderr is not a terminal (a log file, a pipe, CI) bars would be control codes in the
log: the run prints one plain line per finished batch instead, with the same count and ETA.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["FrameProgress", "bars_wanted"]


def bars_wanted() -> bool:
    return sys.stderr.isatty()


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class FrameProgress:
    def __init__(self, total: int, rounds: int, enabled: bool = True,
                 bars: Optional[bool] = None):
        self.total, self.rounds, self.enabled = total, rounds, enabled
        self.bars = bars_wanted() if bars is None else bars
        self.done = 0
        self.round = 0
        self.t0 = time.perf_counter()
        self._bar = None
        if enabled and self.bars and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="frames", unit="frame", position=0,
                             dynamic_ncols=True)

    def start_round(self, r: int, frames_in_round: int) -> None:
        self.round = r
        if self._bar is not None:
            self._bar.set_description(f"round {r}/{self.rounds}")

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else 0.0
        print(f"round {self.round}/{self.rounds}: {self.done}/{self.total} frames, "
              f"{_clock(el)} elapsed, ETA {_clock(eta)}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
