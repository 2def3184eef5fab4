"""The wire format's pieces that need no server: the frame skipper, against frames built by
hand and cut at every kind of boundary."""

from __future__ import annotations

import random

import pytest

from tests.live import frame
from vtrio.framework._wire import FrameSkipper

LIMIT = 1000


def _stream() -> tuple[list[bytes], list[bool]]:
    """Frames of every kind a client sends, and whether each is skipped."""
    return [list(f) for f in zip(*[
        (frame(0x1, b"small"), False),
        (frame(0x1, b"\xff" * (LIMIT + 1)), True),  # skipped unread: invalid UTF-8 and all
        (frame(0x2, b"b" * 70_000), True),  # a 64-bit length
        (frame(0x1, b"x" * LIMIT), False),  # at the limit: read
        (frame(0x9, b"ping"), False),
        (frame(0x1, b"a" * 5000, fin=False), False),  # a fragmented message is never skipped
        (frame(0x9, b""), False),  # a control frame between its fragments
        (frame(0x0, b"b" * 5000), False),
        (frame(0x1, b"u" * 2000, masked=False), False),  # the parser refuses these
        (frame(0x1, b"r" * 2000, rsv=4), False),
        (frame(0x1, b"", fin=True), False),
        (frame(0x2, b"z" * 3000), True),
    ], strict=True)]  # fmt: skip


def _feed(skipper: FrameSkipper, data: bytes, cuts: list[int]) -> tuple[bytes, list[int]]:
    passed, skipped = bytearray(), []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        for part in skipper.feed(data[start:end]):
            if isinstance(part, int):
                skipped.append(part)
            else:
                passed += part
    return bytes(passed), skipped


@pytest.mark.parametrize("seed", range(40))
def test_the_skipper_drops_exactly_the_large_whole_frames_wherever_reads_end(seed: int) -> None:
    frames, skips = _stream()
    data = b"".join(frames)
    rng = random.Random(seed)
    if seed == 0:
        cuts = list(range(1, len(data)))  # one byte at a time
    else:
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 200)))
    passed, skipped = _feed(FrameSkipper(larger_than=LIMIT), data, cuts)
    assert passed == b"".join(f for f, skip in zip(frames, skips, strict=True) if not skip)
    assert skipped == [LIMIT + 1, 70_000, 3000]


def test_a_read_that_needs_nothing_dropped_is_handed_on_without_a_copy() -> None:
    data = frame(0x1, b"hello") + frame(0x1, b"x" * 300)
    parts = list(FrameSkipper(larger_than=LIMIT).feed(data))
    assert len(parts) == 1 and parts[0] is data


def test_the_reader_may_drop_a_skipped_payload_itself() -> None:
    skipper = FrameSkipper(larger_than=LIMIT)
    huge, after = frame(0x1, b"h" * 5000), frame(0x1, b"after")
    assert list(skipper.feed(huge[:100])) == [5000]
    assert skipper.to_drop == len(huge) - 100  # the header was 8 bytes: 4 of size, 4 of mask
    skipper.dropped(skipper.to_drop)  # as a reader that dropped them in the kernel
    assert skipper.to_drop == 0
    assert list(skipper.feed(after)) == [after]
