"""How late an event loop runs what is due: a timer every TICK_S, and the worst lateness of each
second kept for WINDOW_S. A process whose loop is held by one request (a large answer built in
one turn) answers every other request and probe that late; this is the number that shows it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math

TICK_S = 0.05
WINDOW_S = 10.0


class LoopLag:
    """The loop's lateness, sampled by one owned task (`start`, `close`)."""

    def __init__(self, tick_s: float = TICK_S, window_s: float = WINDOW_S) -> None:
        self.tick_s, self.window_s = tick_s, window_s
        self._seconds: collections.deque[tuple[int, float]] = collections.deque(maxlen=math.ceil(window_s) + 1)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def record(self, now: float, lag_s: float) -> None:
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1] = (second, max(self._seconds[-1][1], lag_s))
        else:
            self._seconds.append((second, lag_s))

    def max_s(self, now: float | None = None) -> float:
        """The worst lateness over the last WINDOW_S seconds (0 before the first tick)."""
        now = asyncio.get_running_loop().time() if now is None else now
        since = int(now - self.window_s) + 1  # the seconds that overlap the window
        return max((lag for second, lag in self._seconds if second >= since), default=0.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            self.record(now, max(now - due, 0.0))
