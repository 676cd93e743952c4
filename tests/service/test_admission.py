"""Admission in the engine worker: limits, FIFO, the token budget, refusals (pure logic, a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.admission import Admission, Limits, Refused, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(seqs: int = 2, tokens: int = 100, max_queue: int = 8, shed: bool = False, rps: float | None = None,
         clock: Clock | None = None) -> Admission:
    """Limits below the ceilings (the engine's), as the orchestrator sets them."""
    adm = Admission(Limits(64, 4096), max_queue, target_latency_s=0.5, max_rps=rps, shed=shed,
                    clock=clock or Clock())
    adm.set_limits(seqs, tokens, "test")
    return adm


async def engine_steps(adm: Admission, n: int) -> None:
    """vLLM reports n engine steps; the waiters admitted by them run."""
    for _ in range(n):
        adm.step()
    await asyncio.sleep(0)


async def cancel(waiting: list[asyncio.Future]) -> None:
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_admits_up_to_max_num_seqs_then_queues_first_come_first_served() -> None:
    adm = make(seqs=2)
    a = await adm.admit(1, 1, 0)
    b = await adm.admit(1, 1, 0)
    c = asyncio.ensure_future(adm.admit(1, 1, 0))
    d = asyncio.ensure_future(adm.admit(1, 1, 0))
    await asyncio.sleep(0)
    assert (adm.running, adm.queued) == (2, 2) and not c.done()
    adm.finish(b, 0.1)
    await asyncio.sleep(0)
    assert c.done() and not d.done()  # first come, first served
    adm.finish(a, 0.1)
    await asyncio.sleep(0)
    assert d.done() and adm.queued == 0


async def test_token_budget_counts_prompts_until_two_engine_steps_pass() -> None:
    adm = make(seqs=8, tokens=100)
    first = await adm.admit(1, 80, 0)
    waiting = asyncio.ensure_future(adm.admit(1, 50, 0))
    await asyncio.sleep(0)
    assert not waiting.done() and adm.tokens == 80
    await engine_steps(adm, 1)
    assert not waiting.done()  # one step: the prefill may still be in flight
    await engine_steps(adm, 1)
    assert waiting.done() and adm.tokens == 1 + 50  # the first is decoding now: one token a step
    adm.finish(first, 0.1)


async def test_a_prompt_larger_than_the_budget_goes_in_when_no_other_prompt_is_prefilled() -> None:
    adm = make(seqs=4, tokens=100)
    ticket = await asyncio.wait_for(adm.admit(1, 500, 0), 1)  # alone: at once
    assert adm.running == 1
    small = asyncio.ensure_future(adm.admit(1, 50, 0))
    await asyncio.sleep(0)
    assert not small.done()  # the big prompt is being prefilled
    await engine_steps(adm, 2)
    assert small.done()
    big = asyncio.ensure_future(adm.admit(1, 800, 0))
    await asyncio.sleep(0)
    assert not big.done()  # the small prompt is being prefilled
    await engine_steps(adm, 2)
    assert big.done() and adm.running == 3  # beside two decoding requests
    for t in (ticket, small.result(), big.result()):
        adm.finish(t, None)
    assert (adm.running, adm.tokens, adm.seqs) == (0, 0, 0)


async def test_cancelled_waiter_leaves_the_queue_and_the_next_one_moves_up() -> None:
    adm = make(seqs=1)
    a = await adm.admit(1, 1, 0)
    b = asyncio.ensure_future(adm.admit(1, 1, 0))
    c = asyncio.ensure_future(adm.admit(1, 1, 0))
    await asyncio.sleep(0)
    b.cancel()
    await asyncio.gather(b, return_exceptions=True)
    assert adm.queued == 1
    adm.finish(a, 0.1)
    await asyncio.sleep(0)
    assert c.done() and adm.running == 1


async def test_raising_the_limits_admits_the_waiting_at_once_and_limits_stay_within_ceilings() -> None:
    adm = make(seqs=4)
    adm.set_limits(1, 100, "test")
    await adm.admit(1, 1, 0)
    waiting = [asyncio.ensure_future(adm.admit(1, 1, 0)) for _ in range(3)]
    await asyncio.sleep(0)
    assert adm.queued == 3
    assert adm.set_limits(99, 10_000, "up") == Limits(64, 4096)  # clamped to the ceilings
    await asyncio.sleep(0)
    assert all(w.done() for w in waiting)
    assert adm.set_limits(0, 0, "down") == Limits(1, 1)  # never below 1


async def test_full_queue_is_refused() -> None:
    adm = make(seqs=1, max_queue=2)
    await adm.admit(1, 1, 0)
    queued = [asyncio.ensure_future(adm.admit(1, 1, 0)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Refused) as info:
        adm.check()
    assert info.value.reason == "queue_full" and adm.refused_total["queue_full"] == 1
    await cancel(queued)


async def test_estimated_wait_over_the_target_is_refused_only_in_efficiency_mode() -> None:
    for shed in (True, False):
        clock = Clock()
        adm = make(seqs=1, shed=shed, clock=clock)
        for _ in range(5):  # each takes 0.25 s in vLLM, one at a time
            t = await adm.admit(1, 1, clock.now)
            clock.now += 0.25
            adm.finish(t, 0.1)
        await adm.admit(1, 1, clock.now)
        queued = [asyncio.ensure_future(adm.admit(1, 1, clock.now)) for _ in range(3)]
        await asyncio.sleep(0)
        assert adm.estimated_wait_s() == pytest.approx(4 * 0.25)  # 4th in line, 0.25 s each
        if shed:
            with pytest.raises(Refused) as info:
                adm.check()
            assert info.value.reason == "too_slow" and info.value.retry_after_s >= 0.5
        else:
            adm.check()
        await cancel(queued)


def test_nothing_queued_is_never_refused_for_slowness() -> None:
    adm = make(shed=True)
    adm.check()
    assert adm.estimated_wait_s() == 0.0


@pytest.mark.parametrize("shed", [True, False])
def test_rate_limit_rps_caps_requests_per_second_in_either_mode(shed: bool) -> None:
    clock = Clock()
    adm = make(shed=shed, rps=10, clock=clock)
    for _ in range(10):
        adm.check()  # a second's worth of burst
    with pytest.raises(Refused) as info:
        adm.check()
    assert info.value.reason == "rate_limit" and "rate_limit_rps=10" in str(info.value)
    clock.now += 0.11  # one more token
    adm.check()


def test_no_rate_limit_rps_means_no_cap() -> None:
    adm = make(shed=True, rps=None)
    for _ in range(10_000):
        adm.check()
    assert adm.refused_total["rate_limit"] == 0


async def test_latency_percentiles_cover_the_window_only() -> None:
    clock = Clock()
    adm = make(seqs=100, clock=clock)
    for i in range(20):
        t = await adm.admit(1, 1, clock.now - 0.01 * (i + 1))
        adm.finish(t, 0.005)
    clock.now += 30
    t = await adm.admit(1, 1, clock.now - 2.0)  # arrived 2 s ago for admission…
    clock.now += 0.5  # …and spent 0.5 s in vLLM
    adm.finish(t, 1.0)
    pct = adm.percentiles(10.0)
    assert pct.count == 1 and pct.e2e_p50_s == pytest.approx(2.5) and pct.ttft_p50_s == 1.0
    assert pct.service_p95_s == pytest.approx(0.5)
    assert adm.percentiles(60.0).count == 21


async def test_idle_gaps_between_requests_do_not_inflate_the_wait() -> None:
    clock = Clock()
    adm = make(seqs=1, shed=True, clock=clock)
    for _ in range(10):  # quick requests, far apart
        t = await adm.admit(1, 1, clock.now)
        clock.now += 0.01
        adm.finish(t, 0.005)
        clock.now += 4.0
    await adm.admit(1, 1, clock.now)
    queued = [asyncio.ensure_future(adm.admit(1, 1, clock.now)) for _ in range(3)]
    await asyncio.sleep(0)
    assert adm.estimated_wait_s() == pytest.approx(0.04)
    adm.check()  # not refused: four quick requests ahead
    await cancel(queued)


async def test_at_the_ceilings_requests_pass_through_to_vllms_own_queue() -> None:
    clock = Clock()
    adm = Admission(Limits(2, 100), 8, target_latency_s=0.5, max_rps=None, shed=True, clock=clock)
    t = await adm.admit(1, 1, clock.now)
    clock.now += 0.2
    adm.finish(t, 0.05, running_s=0.2)
    tickets = [await asyncio.wait_for(adm.admit(1, 1, clock.now), 1) for _ in range(5)]  # none held here
    assert (adm.running, adm.queued, adm.backlog) == (5, 0, 3)  # vLLM runs 2, 3 wait in its queue
    assert adm.estimated_wait_s() == pytest.approx(4 * 0.2 / 2)
    for t in tickets:
        adm.finish(t, None)


def test_the_wait_allowed_is_an_answer_within_twice_the_average_target() -> None:
    """A closed loop of 100 clients at 100 requests/s waits 1 s per answer (Little's law): the
    spec's `ab -c 100` at its own 100 requests/s sits at twice its 500 ms target."""
    adm = make(shed=True)  # target 0.5 s
    adm.service_s = 0.2
    assert adm.wait_allowance_s() == pytest.approx(0.8)  # 0.8 s wait + 0.2 s to generate = 1 s
    adm.service_s = 32 / 105  # 32 sequences at the spec's "more than 100" requests/s; 68 of 100 wait
    adm.limits = Limits(32, 512)
    adm._queue.extend(Ticket(1, 1, 0.0) for _ in range(67))  # the 68th asks
    assert adm.estimated_wait_s() == pytest.approx(68 / 105)
    assert adm.estimated_wait_s() < adm.wait_allowance_s()  # not refused
    adm.service_s = 32 / 90  # too slow for the spec's throughput: the same backlog is refused
    assert adm.estimated_wait_s() > adm.wait_allowance_s()
    adm._queue.clear()
    adm.service_s = 1.9  # long generations: a quarter of the target is always allowed
    assert adm.wait_allowance_s() == pytest.approx(0.125)


async def test_waiting_means_one_thing_at_the_ceilings_too() -> None:
    """At the ceilings requests pass straight through to vLLM's own queue: those waiting there
    count against max_queue like those waiting here."""
    clock = Clock()
    adm = Admission(Limits(2, 100), 3, target_latency_s=0.5, max_rps=None, shed=False, clock=clock)
    tickets = [await asyncio.wait_for(adm.admit(1, 1, clock.now), 1) for _ in range(5)]  # 2 run, 3 wait in vLLM
    assert adm.backlog == 3
    with pytest.raises(Refused) as refused:
        adm.check()
    assert refused.value.reason == "queue_full"
    adm.finish(tickets[0], None)
    adm.check()  # room again
    for t in tickets[1:]:
        adm.finish(t, None)


async def test_requests_being_tokenized_count_as_waiting() -> None:
    """A burst arriving at once is all past check() before any of it is queued: those still
    being tokenized count against max_queue beyond what vLLM may run."""
    clock = Clock()
    adm = Admission(Limits(2, 100), 3, target_latency_s=0.5, max_rps=None, shed=False, clock=clock)
    with adm.preparing(2):  # these would start at once: not waiting
        adm.check()
        with adm.preparing(3):
            assert adm.backlog == 3
            with pytest.raises(Refused) as refused:
                adm.check()
            assert refused.value.reason == "queue_full"
    assert adm.arriving == 0 and adm.backlog == 0
    with pytest.raises(ValueError), adm.preparing(4):  # a prompt that fails to tokenize leaves no trace
        raise ValueError("bad prompt")
    assert adm.arriving == 0


async def test_the_health_probe_is_not_counted() -> None:
    clock = Clock()
    adm = make()
    probe = await adm.admit(1, 1, clock.now, counted=False)
    clock.now += 0.1
    adm.finish(probe, 0.05, running_s=0.1)
    assert (adm.admitted_total, len(adm.latencies), adm.service_s) == (0, 0, 0.0)
    t = await adm.admit(1, 1, clock.now)
    adm.finish(t, 0.05, running_s=0.2)
    assert (adm.admitted_total, len(adm.latencies), adm.service_s) == (1, 1, 0.2)


def test_tokenize_calls_beyond_max_queue_are_refused() -> None:
    adm = make(max_queue=8)
    adm.check_tokenizing(7)
    with pytest.raises(Refused, match="tokenize"):
        adm.check_tokenizing(8)
