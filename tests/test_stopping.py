"""The service tree's one stop signal: its deadline, its shields, and its hurry."""

from __future__ import annotations

import math

import trio
import trio.lowlevel
import trio.testing

from vtrio.framework import Stopping


async def test_a_shielded_cleanup_before_any_stop_starts_no_clock() -> None:
    stopping = Stopping(0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopping.hurry_at_deadline)
        with stopping.shielded():  # e.g. a job's last write, in normal operation
            await trio.lowlevel.checkpoint()
        assert stopping.deadline == math.inf
        await trio.sleep(1)
        assert not stopping.requested  # the server was not stopped behind anyone's back
        nursery.cancel_scope.cancel()


async def test_a_failing_tree_is_bounded_by_one_grace_period_and_then_hurried() -> None:
    stopping = Stopping(0.5)
    hurried: list[float] = []
    stopping.on_hurry(lambda: hurried.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopping.hurry_at_deadline)
        start = trio.current_time()
        stopping.coming_down()
        with stopping.shielded() as scope:
            await trio.sleep_forever()  # a cleanup that would never end
        assert scope.cancelled_caught
    assert len(hurried) == 1 and 0.5 <= hurried[0] - start < 1.0


async def test_a_stop_request_and_a_hurry() -> None:
    stopping = Stopping(30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopping.wait)
        stopping.request()
        await trio.testing.wait_all_tasks_blocked()
    assert stopping.requested and stopping.deadline - trio.current_time() <= 30
    with stopping.shielded() as scope:
        stopping.hurry()  # a second Ctrl-C: every shielded cleanup is cut short, at once
        await trio.sleep(10)
    assert scope.cancelled_caught and stopping.deadline <= trio.current_time()
