"""A synthetic FASTQ file whose statistics take a chosen amount of CPU time.

The file repeats one block of 4,000 random 150 bp reads. Its size is calibrated on this machine:
``chunk_stats`` (the per-chunk function both servers run in their process pools) is timed on the
block, and the block is repeated until the whole file needs ``seconds`` of one core's time.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

READS_PER_BLOCK = 4000
READ_LENGTH = 150

_BASES = bytes(b"ACGT"[i % 4] for i in range(256))
_QUALITIES = bytes(33 + 2 + i % 39 for i in range(256))


def block(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    records = []
    for index in range(READS_PER_BLOCK):
        sequence = rng.randbytes(READ_LENGTH).translate(_BASES)
        quality = rng.randbytes(READ_LENGTH).translate(_QUALITIES)
        records.append(b"@read%d\n%s\n+\n%s\n" % (index, sequence, quality))
    return b"".join(records)


def seconds_per_byte(data: bytes) -> float:
    from vtrio.virtool import chunk_stats

    chunk_stats(b"", data, True, 1, 0)  # warm up
    started = time.perf_counter()
    chunk_stats(b"", data * 4, True, 1, 0)
    return (time.perf_counter() - started) / (4 * len(data))


def write(path: Path, *, seconds: float) -> int:
    """Write a FASTQ file needing about ``seconds`` of CPU for its statistics; return its size."""
    data = block()
    repeats = max(1, round(seconds / (seconds_per_byte(data) * len(data))))
    with path.open("wb") as file:
        for _ in range(repeats):
            file.write(data)
    return repeats * len(data)
