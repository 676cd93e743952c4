"""shared/loop_lag.py: the worst lateness per second, kept for the window, and a real loop held
by a blocking call shows it."""

from __future__ import annotations

import asyncio
import time

from shared.loop_lag import LoopLag


def test_the_worst_of_each_second_is_kept_for_the_window() -> None:
    lag = LoopLag(window_s=3)
    lag.record(100.1, 0.01)
    lag.record(100.9, 0.2)
    lag.record(101.5, 0.05)
    assert lag.max_s(now=101.6) == 0.2
    assert lag.max_s(now=102.9) == 0.2  # 100, 101, 102: still inside three seconds
    assert lag.max_s(now=103.0) == 0.05  # 100 has left the window
    assert lag.max_s(now=110.0) == 0.0


async def test_a_loop_held_by_a_blocking_call_shows_its_lag() -> None:
    lag = LoopLag(tick_s=0.01)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # one turn of the loop that holds it
        await asyncio.sleep(0.05)
        assert lag.max_s() >= 0.25
    finally:
        await lag.close()
