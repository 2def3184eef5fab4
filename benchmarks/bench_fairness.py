"""Fairness: does one connection sending huge frames slow down everyone else's requests?

For each server: a victim connection calls ``system.info`` one call at a time (each waits for
the previous answer; one aggregate of the jobs collection per call, on both servers) for the
window, idle: the reference. Then an attacker (``benchmarks.attacker``, a process of its own)
sends 100 frames of 868,965 bytes each, as fast as the socket takes them: a JSON-RPC
``samples.update`` whose ``params`` hold 80,000 fields that no method has, under the 1 MiB
message size limit of both servers. The victim keeps calling meanwhile; its calls started
between the attacker's first byte and the server's answer to the last frame are the "under
attack" sample.

Figures: the victim's p50 and p99 latency idle and under attack, p99 under attack relative to
idle (1.00: unaffected; target: within 2x), how long the server took to answer all 100 frames,
and the server's CPU time per attack frame (the victim's calls meanwhile charged at their idle
cost and taken out).

What each server does with such a frame: vtrio reads it (64 KiB per turn of its scheduler,
other connections served in between) and refuses it unparsed, as larger than 256 KiB (-32600);
a smaller one with too many fields would be refused before pydantic. Beyond 4 MiB of refused
messages, it reads that connection no faster than 64 MiB/s (``ConnectionLimits.refused_rate``).
The baseline does what the design it stands for did: aiohttp reads the whole message,
``json.loads`` parses it and pydantic validates it (80,000 "extra fields" errors), all on the
event loop.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from benchmarks.harness import Context
from benchmarks.procs import cpu_ns
from benchmarks.rawws import RpcClient
from benchmarks.servers import Server, median, percentile, running_server

TITLE = "a huge-frame sender against a small caller"
NAME = "fairness"
FIELDS = 80_000
WARM_UP_CALLS = 20


def frames(ctx: Context) -> int:
    return 10 if ctx.options.smoke else 100


async def run(ctx: Context) -> None:
    async def measure(side: str) -> None:
        async with running_server(ctx, side) as server, server.rpc() as victim:
            for _ in range(WARM_UP_CALLS):
                await victim.call("system.info")
            cpu0 = cpu_ns(server.pid) or 0
            idle = await _calls_for(victim, ctx.sizes.window)
            cpu_per_call = ((cpu_ns(server.pid) or 0) - cpu0) / len(idle)
            attack, during = await _under_attack(ctx, server, victim)
        # The server's CPU for the attack alone: the victim's calls meanwhile (as many as a
        # slowed attack leaves room for) are charged at their idle cost.
        attack["cpu_ns"] -= attack.pop("victim_calls") * cpu_per_call
        _record(ctx, side, idle, during, attack)

    await ctx.each_side(measure)


async def _calls_for(victim: RpcClient, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        await victim.call("system.info")
        latencies.append(time.perf_counter() - started)
    return latencies


async def _under_attack(
    ctx: Context, server: Server, victim: RpcClient
) -> tuple[dict[str, Any], list[float]]:
    count = frames(ctx)
    attacker = ctx.children.python(
        f"attacker-{server.side}", "benchmarks.attacker",
        "--url", server.url, "--key", server.key, "--frames", str(count),
        "--fields", str(FIELDS), pipes=True,
    )  # fmt: skip
    calls: list[tuple[int, float]] = []  # (start, latency) of every victim call
    done = trio.Event()

    async def call_until_done() -> None:
        while not done.is_set():
            started_ns = time.monotonic_ns()
            started = time.perf_counter()
            await victim.call("system.info")
            calls.append((started_ns, time.perf_counter() - started))

    try:
        with trio.fail_after(30):
            ready = json.loads(await attacker.read_line())
        assert ready["ready"], ready
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_until_done)
            await trio.sleep(0.05)  # the victim's loop is running
            cpu0, calls_before = cpu_ns(server.pid) or 0, len(calls)
            await attacker.send_line("go")
            with trio.fail_after(180):
                result = json.loads(await attacker.read_line())
            result["cpu_ns"] = (cpu_ns(server.pid) or 0) - cpu0
            result["victim_calls"] = len(calls) - calls_before
            done.set()
    finally:
        attacker.kill_group()
    # Every call that overlapped the attack, from the first byte sent to the last answer.
    begin, end = result["started_ns"], result["ended_ns"]
    during = [
        latency for start, latency in calls if start <= end and start + latency * 1e9 >= begin
    ]
    result["frames"] = count
    return result, during


def _record(
    ctx: Context, side: str, idle: list[float], during: list[float], attack: dict[str, Any]
) -> None:
    count = attack["frames"]
    size = f"{count} frames of {attack['frame_bytes'] / 1000:.0f} kB"
    idle_p99, during_p99 = percentile(idle, 0.99), percentile(during, 0.99)
    seconds = (attack["ended_ns"] - attack["started_ns"]) / 1e9
    ctx.record(NAME, "system.info p50, idle", side, median(idle), "s")
    ctx.record(NAME, "system.info p99, idle", side, idle_p99, "s")
    ctx.record(NAME, f"system.info p50, attacker sending {size}", side, median(during), "s")
    ctx.record(NAME, f"system.info p99, attacker sending {size}", side, during_p99, "s")
    ctx.record(NAME, "system.info p99 under attack, relative to idle (target <= 2x)", side,
               during_p99 / idle_p99, "x")  # fmt: skip
    ctx.record(NAME, f"server answered all {count} attack frames in", side, seconds, "s")
    ctx.record(
        NAME,
        "server CPU per attack frame (beyond the victim's calls)",
        side,
        attack["cpu_ns"] / 1e9 / count,
        "s",
    )
    ctx.log(
        f"{NAME}: {side}: idle p50 {median(idle) * 1e3:.2f} ms p99 {idle_p99 * 1e3:.2f} ms "
        f"({len(idle)} calls); under attack p50 {median(during) * 1e3:.2f} ms p99 "
        f"{during_p99 * 1e3:.2f} ms ({len(during)} calls); {attack['answers']}/{count} frames "
        f"answered in {seconds:.2f} s, close code {attack['close_code']}, "
        f"{attack['cpu_ns'] / 1e6 / count:.1f} ms server CPU per frame"
    )
    if attack["answers"] < count:
        raise RuntimeError(
            f"{side} answered {attack['answers']} of {count} attack frames "
            f"(close code {attack['close_code']})"
        )
