"""Tests of vtrio.fastq: read statistics of FASTQ files, computed chunk by chunk in workers.

Expected statistics are computed here independently, read by read and base by base, and the
module's results must equal them exactly. Real trio-parallel workers run the chunks (their
processes are cached between tests, so only the first test pays for starting them).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import os
import pickle
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_parallel

from vtrio import virtool
from vtrio.virtool import FastqError, ReadStats, chunk_stats
from vtrio.virtool import _fastq as fastq

run_in_process = functools.partial(trio_parallel.run_sync, kill_on_cancel=True)

QUALITY_CHARS = bytes(range(ord("!"), ord("~") + 1))


async def read_statistics(path: Path, **options: Any) -> dict[str, Any]:
    """``read_statistics`` of the file at ``path``, opened and closed here as the job does."""
    async with await trio.open_file(path, "rb") as file:
        return await virtool.read_statistics(file, **options)


def make_fastq(
    rng: random.Random,
    reads: int,
    lengths: tuple[int, int] = (50, 150),
    *,
    newline: bytes = b"\n",
    plus_names: bool = False,
) -> bytes:
    """Random FASTQ records with read lengths in ``lengths`` (inclusive)."""
    records = []
    for i in range(reads):
        length = rng.randint(*lengths)
        seq = bytes(rng.choices(b"ACGTNacgt", weights=(25, 25, 25, 25, 2, 1, 1, 1, 1), k=length))
        qual = bytes(rng.choices(QUALITY_CHARS, k=length))
        name = b"read_%d length=%d" % (i, length)
        plus = b"+" + name if plus_names else b"+"
        records.append(newline.join([b"@" + name, seq, plus, qual, b""]))
    return b"".join(records)


def expected_quality(text: bytes) -> dict[str, Any]:
    """The quality document of FASTQ ``text``, computed the plain way."""
    lines = text.replace(b"\r\n", b"\n").split(b"\n")
    while lines and lines[-1] == b"":
        lines.pop()
    assert len(lines) % 4 == 0
    lengths: list[int] = []
    position_sums: list[int] = []
    position_counts: list[int] = []
    distribution: dict[int, int] = {}
    gc = 0
    for i in range(0, len(lines), 4):
        seq, qual = lines[i + 1], lines[i + 3]
        lengths.append(len(seq))
        gc += sum(base in b"GCgc" for base in seq)
        scores = [char - 33 for char in qual]
        for position, score in enumerate(scores):
            if position == len(position_sums):
                position_sums.append(0)
                position_counts.append(0)
            position_sums[position] += score
            position_counts[position] += 1
        if scores:
            mean = sum(scores) // len(scores)
            distribution[mean] = distribution.get(mean, 0) + 1
    bases = sum(lengths)
    return {
        "count": len(lengths),
        "bases": bases,
        "length": [min(lengths, default=0), max(lengths, default=0)],
        "gc": 100 * gc / bases if bases else 0.0,
        "mean_quality_by_position": [
            s / n for s, n in zip(position_sums, position_counts, strict=True)
        ],
        "quality_distribution": [
            distribution.get(q, 0) for q in range(max(distribution, default=-1) + 1)
        ],
    }


async def write(path: Path, data: bytes) -> Path:
    await trio.Path(path).write_bytes(data)
    return path


def gzip_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(part) for part in parts)


# --- the per-chunk function --------------------------------------------------------------


def test_worked_example() -> None:
    # Scores: 'I' = 40, '!' = 0, '+' = 10, '6' = 21.
    text = b"@a\nACGT\n+\nIIII\n@b\nGGN\n+\n!+6\n"
    stats, consumed = chunk_stats(b"", text, True, 1, 0)
    assert consumed == len(text)
    assert stats.as_quality() == {
        "count": 2,
        "bases": 7,
        "length": [3, 4],
        "gc": 100 * 4 / 7,  # C, G, G, G; N counts as a base
        "mean_quality_by_position": [20.0, 25.0, 30.5, 40.0],
        # Read b's mean is 31 / 3 = 10.33..., counted as 10.
        "quality_distribution": [0] * 10 + [1] + [0] * 29 + [1],
    }


def test_chunk_stats_consumes_whole_records_only() -> None:
    text = make_fastq(random.Random(1), 20)
    cut = len(text) // 2 + 7  # inside a record, whatever the lengths
    first, consumed = chunk_stats(b"", text[:cut], False, 1, 0)
    assert text[:consumed].count(b"\n") == 4 * first.count
    assert text[consumed : consumed + 1] == b"@"  # the next record starts there
    second, consumed_too = chunk_stats(text[consumed:cut], text[cut:], False, first.count + 1, 0)
    assert consumed + consumed_too == len(text)
    assert first.merge(second).as_quality() == expected_quality(text)


def test_chunk_stats_of_each_split_merge_to_the_whole() -> None:
    text = make_fastq(random.Random(2), 12, (1, 30))
    for cut in range(len(text) + 1):
        head, consumed = chunk_stats(b"", text[:cut], False, 1, 0)
        tail, _ = chunk_stats(text[consumed:cut], text[cut:], True, head.count + 1, consumed)
        assert head.merge(tail).as_quality() == expected_quality(text), cut


def test_many_reads_at_the_highest_score_do_not_overflow() -> None:
    # More reads than a 16-bit field can sum at score 93, of one length and of several.
    reads = 3000
    uniform = b"".join(b"@r\nACGT\n+\n~~~~\n" for _ in range(reads))
    stats, _ = chunk_stats(b"", uniform, True, 1, 0)
    quality = stats.as_quality()
    assert quality["mean_quality_by_position"] == [93.0] * 4
    assert quality["quality_distribution"] == [0] * 93 + [reads]
    mixed = uniform + b"".join(b"@r\nAC\n+\n!~\n" for _ in range(reads))
    stats, _ = chunk_stats(b"", mixed, True, 1, 0)
    assert stats.as_quality() == expected_quality(mixed)


def test_read_stats_pickle_for_the_trip_back_from_a_worker() -> None:
    stats, _ = chunk_stats(b"", make_fastq(random.Random(3), 5), True, 1, 0)
    assert pickle.loads(pickle.dumps(stats)) == stats
    error = FastqError("bad", 3, 120)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.record, copy.offset) == ("bad", 3, 120)


def test_merge_pads_the_shorter_positions() -> None:
    short, _ = chunk_stats(b"", b"@a\nAC\n+\n#I\n", True, 1, 0)
    long, _ = chunk_stats(b"", b"@b\nACGT\n+\nIIII\n", True, 1, 0)
    merged = ReadStats().merge(short).merge(long)
    assert merged.position_sums == [2 + 40, 40 + 40, 40, 40]
    assert merged.as_quality()["mean_quality_by_position"] == [21.0, 40.0, 40.0, 40.0]


# --- whole files -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [97, 300, 4096, fastq.DEFAULT_CHUNK_SIZE])
async def test_plain_file(tmp_path: Path, chunk_size: int) -> None:
    text = make_fastq(random.Random(chunk_size), 200)
    assert len(text) % 300 and len(text) % 97  # the last chunk is a partial one
    path = await write(tmp_path / "reads.fq", text)
    result = await read_statistics(path, run_in_process=run_in_process, chunk_size=chunk_size)
    assert result == expected_quality(text)


@pytest.mark.parametrize("chunk_size", [50, 300, 5000])
async def test_multi_member_gzip_with_padding(tmp_path: Path, chunk_size: int) -> None:
    rng = random.Random(10 + chunk_size)
    parts = [make_fastq(rng, 40), make_fastq(rng, 1), b"", make_fastq(rng, 77, (1, 300))]
    compressed = gzip_members(*parts) + b"\0" * 16  # zero padding, as gzip(1) accepts
    path = await write(tmp_path / "reads.fastq", compressed)  # the name does not say gzip
    result = await read_statistics(path, run_in_process=run_in_process, chunk_size=chunk_size)
    assert result == expected_quality(b"".join(parts))


async def test_gzip_member_boundary_inside_a_record(tmp_path: Path) -> None:
    text = make_fastq(random.Random(11), 30)
    pieces = [text[i : i + 101] for i in range(0, len(text), 101)]
    path = await write(tmp_path / "reads", gzip_members(*pieces))
    result = await read_statistics(path, run_in_process=run_in_process, chunk_size=256)
    assert result == expected_quality(text)


async def test_gz_name_without_gzip_data_is_read_as_plain(tmp_path: Path) -> None:
    text = make_fastq(random.Random(12), 10)
    path = await write(tmp_path / "reads.fq.gz", text)
    assert await read_statistics(path, run_in_process=run_in_process) == expected_quality(text)


async def test_variable_lengths(tmp_path: Path) -> None:
    rng = random.Random(13)
    text = make_fastq(rng, 300, (1, 40)) + b"@empty\n\n+\n\n" + make_fastq(rng, 3, (500, 900))
    path = await write(tmp_path / "reads.fq", text)
    result = await read_statistics(path, run_in_process=run_in_process, chunk_size=512)
    expected = expected_quality(text)
    assert result == expected
    assert result["length"][0] == 0 and result["length"][1] >= 500
    assert len(result["mean_quality_by_position"]) == result["length"][1]
    # The empty read counts as a read but has no mean score.
    assert sum(result["quality_distribution"]) == result["count"] - 1


async def test_one_record_longer_than_many_chunks(tmp_path: Path) -> None:
    rng = random.Random(14)
    text = make_fastq(rng, 2) + make_fastq(rng, 1, (20_000, 20_000)) + make_fastq(rng, 2)
    path = await write(tmp_path / "reads.fq", text)
    calls = []

    async def counting(fn: Callable[..., Any], *args: Any) -> Any:
        calls.append(len(args[0]) + len(args[1]))
        return await run_in_process(fn, *args)

    result = await read_statistics(path, run_in_process=counting, chunk_size=100)
    assert result == expected_quality(text)
    assert len(calls) < 40  # the buffer doubles rather than grows by a chunk at a time


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"@a\r\nACGT\r\n+\r\nIIII\r\n@b\r\nGG\r\n+\r\n#I\r\n", id="crlf"),
        pytest.param(b"@a\nACGT\n+\nIIII\n@b\nGG\n+\n#I", id="no-final-newline"),
        pytest.param(b"@a\nACGT\n+\nIIII\n@b\nGG\n+\n#I\n\n\n", id="trailing-blank-lines"),
        pytest.param(b"@a\nACGT\n+a\nIIII\n@b\nGG\n+b\n@@\n", id="named-plus-and-at-quality"),
        pytest.param(b"@a\nACGT\n+\n!!~~\n", id="lowest-and-highest-score"),
    ],
)
async def test_accepted_variants(tmp_path: Path, text: bytes) -> None:
    path = await write(tmp_path / "reads.fq", text)
    for chunk_size in (1, 5, 1000):
        result = await read_statistics(path, run_in_process=run_in_process, chunk_size=chunk_size)
        assert result == expected_quality(text.rstrip(b"\n") + b"\n")


@pytest.mark.parametrize("data", [b"", gzip.compress(b"")], ids=["empty", "empty-gzip"])
async def test_empty_file_has_no_reads(tmp_path: Path, data: bytes) -> None:
    path = await write(tmp_path / "reads.fq", data)
    progress: list[float] = []
    result = await read_statistics(path, run_in_process=run_in_process, on_progress=progress.append)
    assert result == {
        "count": 0,
        "bases": 0,
        "length": [0, 0],
        "gc": 0.0,
        "mean_quality_by_position": [],
        "quality_distribution": [],
    }
    assert progress == [1.0]


async def test_worker_results_match_a_big_generated_file(tmp_path: Path) -> None:
    rng = random.Random(15)
    text = make_fastq(rng, 3000, (100, 151), plus_names=True)
    path = await write(tmp_path / "reads.fq.gz", gzip.compress(text, compresslevel=1))
    result = await read_statistics(path, run_in_process=run_in_process, chunk_size=64 * 1024)
    assert result == expected_quality(text)


# --- files that are not FASTQ ------------------------------------------------------------

RECORD = b"@r1\nACGT\n+\nIIII\n"  # 16 bytes


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            b"Hello, this is a text file.\nIt has lines.\n",
            "record 1 (byte offset 0): expected a header line starting with '@', "
            "found 'Hello, this is a text file.'",
            id="text",
        ),
        pytest.param(
            b">seq1\nACGT\n>seq2\nGGCC\n",
            "record 1 (byte offset 0): expected a header line starting with '@', found '>seq1' "
            "(this looks like FASTA, not FASTQ)",
            id="fasta",
        ),
        pytest.param(
            RECORD + b"@r2\nACGT\n+\n",
            "record 2 (byte offset 16) is truncated: the file ends after 3 of its 4 lines",
            id="truncated",
        ),
        pytest.param(
            RECORD * 3 + b"@r4\nACGT\n+\nIII\n" + RECORD,
            "record 4 (byte offset 48): its sequence has 4 characters but its quality line has 3",
            id="mismatched-lengths",
        ),
        pytest.param(
            RECORD + b"@r2\nACGT\nIIII\n" + RECORD,
            "record 2 (byte offset 16): expected the third line to start with '+', found 'IIII'",
            id="plus-missing",
        ),
        pytest.param(
            RECORD + b"@r2\nACGT\n+\nII I\n",
            "record 2 (byte offset 16): quality character ' ' at position 2 is not Phred+33 "
            "('!' to '~')",
            id="bad-quality-character",
        ),
        pytest.param(
            RECORD + b"\n" + RECORD,
            "record 2 (byte offset 16): expected a header line starting with '@', found ''",
            id="blank-line-between-records",
        ),
    ],
)
@pytest.mark.parametrize("chunk_size", [3, 4096])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_not_fastq(
    tmp_path: Path, data: bytes, message: str, chunk_size: int, compress: bool
) -> None:
    path = await write(tmp_path / "reads", gzip.compress(data) if compress else data)
    with pytest.raises(FastqError) as info:
        await read_statistics(path, run_in_process=run_in_process, chunk_size=chunk_size)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    assert info.value.record == int(message.split()[1])


async def test_no_newline_fails_at_the_record_size_limit(tmp_path: Path) -> None:
    junk = random.Random(16).randbytes(50_000).replace(b"\n", b"x")
    path = await write(tmp_path / "reads", b"@" + junk)
    with pytest.raises(FastqError, match=r"record 1 \(byte offset 0\) is longer than 10000 bytes"):
        await read_statistics(
            path, run_in_process=run_in_process, chunk_size=1000, max_record_size=10_000
        )


async def test_binary_file_fails_at_once(tmp_path: Path) -> None:
    path = await write(tmp_path / "reads.bam", b"BAM\x01" + bytes(200_000))
    calls = []

    async def counting(fn: Callable[..., Any], *args: Any) -> Any:
        calls.append(fn)
        return await run_in_process(fn, *args)

    with pytest.raises(FastqError, match="expected a header line starting with '@', found 'BAM"):
        await read_statistics(path, run_in_process=counting, chunk_size=1000)
    assert len(calls) == 1


@pytest.mark.parametrize("where", ["first-block", "checksum"])
async def test_corrupt_gzip(tmp_path: Path, where: str) -> None:
    compressed = bytearray(gzip.compress(make_fastq(random.Random(17), 50)))
    if where == "first-block":
        compressed[10] = 0b110  # after the 10-byte header: a block of the reserved type 3
    else:
        compressed[-8] ^= 0xFF  # the CRC-32 of the member's data
    path = await write(tmp_path / "reads.gz", bytes(compressed))
    with pytest.raises(FastqError, match="the gzip data is corrupt"):
        await read_statistics(path, run_in_process=run_in_process, chunk_size=512)


async def test_truncated_gzip(tmp_path: Path) -> None:
    compressed = gzip.compress(make_fastq(random.Random(18), 50))
    path = await write(tmp_path / "reads.gz", compressed[:-20])
    with pytest.raises(FastqError, match="the gzip data is truncated"):
        await read_statistics(path, run_in_process=run_in_process, chunk_size=512)


async def test_garbage_after_gzip_member(tmp_path: Path) -> None:
    compressed = gzip.compress(RECORD) + b"not gzip"
    path = await write(tmp_path / "reads.gz", compressed)
    with pytest.raises(FastqError, match="the gzip data is corrupt"):
        await read_statistics(path, run_in_process=run_in_process)


# --- progress and cancellation -----------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_progress_fractions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compress: bool, is_async: bool
) -> None:
    monkeypatch.setattr(fastq, "PROGRESS_INTERVAL", 0)  # report every chunk
    text = make_fastq(random.Random(19), 400)
    data = gzip.compress(text) if compress else text
    path = await write(tmp_path / "reads", data)
    fractions: list[float] = []

    async def record_async(fraction: float) -> None:
        await trio.lowlevel.checkpoint()
        fractions.append(fraction)

    on_progress = record_async if is_async else fractions.append

    await read_statistics(
        path, run_in_process=run_in_process, chunk_size=2048, on_progress=on_progress
    )
    assert len(fractions) > 5
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and fractions.count(1.0) == 1
    assert all(0.0 <= f <= 1.0 for f in fractions)


async def test_progress_is_throttled(tmp_path: Path) -> None:
    text = make_fastq(random.Random(20), 400)
    path = await write(tmp_path / "reads", text)
    times: list[float] = []
    await read_statistics(
        path,
        run_in_process=run_in_process,
        chunk_size=512,  # > 100 chunks
        on_progress=lambda _: times.append(trio.current_time()),
    )
    intermediate = times[:-1]
    assert all(b - a >= fastq.PROGRESS_INTERVAL for a, b in itertools.pairwise(intermediate))
    assert len(times) < 100


def open_fds_to(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    target = str(path.resolve())
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == target)


def slow_chunk_stats(*args: Any) -> Any:
    """``chunk_stats`` in a worker that takes far longer than any test may wait."""
    time.sleep(60)
    return chunk_stats(*args)


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_cancellation_is_prompt_and_closes_the_file(tmp_path: Path, compress: bool) -> None:
    text = make_fastq(random.Random(21), 2000)
    path = await write(tmp_path / "reads", gzip.compress(text) if compress else text)
    calls: list[str] = []
    second_call = trio.Event()

    async def second_is_slow(fn: Callable[..., Any], *args: Any) -> Any:
        # The first chunk is computed; the second one, mid-file, never would be in time.
        calls.append("started")
        if len(calls) == 1:
            return await run_in_process(fn, *args)
        second_call.set()
        try:
            return await run_in_process(slow_chunk_stats, *args)
        except trio.Cancelled:
            calls.append("cancelled")
            raise

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                read_statistics, path, run_in_process=second_is_slow, chunk_size=64 * 1024
            )
        )
        await second_call.wait()
        await trio.sleep(0.05)  # the worker is in time.sleep()
        assert open_fds_to(path) == 1
        cancelled_at = time.perf_counter()
        nursery.cancel_scope.cancel()
    latency = time.perf_counter() - cancelled_at
    assert calls == ["started", "started", "cancelled"]
    assert latency < 1.0, latency  # the worker was killed, not waited for
    assert open_fds_to(path) == 0


async def test_a_last_read_of_length_zero_is_not_taken_for_a_truncated_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "zero.fq"
    path.write_bytes(b"@a\nAC\n+\nII\n@empty\n\n+\n\n\n\n")
    quality = await read_statistics(path, run_in_process=run_in_process, chunk_size=4)
    assert quality["count"] == 2
    assert quality["length"] == [0, 2]
