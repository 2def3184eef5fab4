"""Read statistics of a sample's FASTQ file, computed in chunks in worker processes.

``read_statistics`` streams a plain or gzip-compressed FASTQ file through ``trio.open_file`` in
chunks of a few MiB, hands each chunk to a worker process (``chunk_stats``) and merges the
partial statistics (``ReadStats.merge``) into the sample's ``quality`` document::

    {
        "count": 3,                     # reads
        "bases": 441,                   # bases of all reads
        "length": [145, 150],           # [shortest, longest] read
        "gc": 48.97959183673469,        # percent of all bases that are G or C, unrounded
        "mean_quality_by_position": [34.0, 34.666666666666664, ...],
        "quality_distribution": [0, 0, ..., 1, 2],
    }

Decisions, documented here once:

- ``gc`` is ``100 * (G + C) / bases`` counting ``G``, ``C``, ``g`` and ``c``; every other
  character (``N`` included) counts in the denominator only. It is not rounded: clients round
  for display, and an unrounded value can be checked exactly.
- ``mean_quality_by_position[i]`` is the mean Phred score at 0-based position ``i`` over the
  reads that are longer than ``i`` (a float, unrounded).
- ``quality_distribution`` is a list indexed by Phred score: ``quality_distribution[q]`` is the
  number of reads whose mean score, rounded down (floor, as FastQC does), is ``q``. It runs
  from score 0 to the highest mean score seen, so a JSON client can plot it directly, like
  Virtool's FastQC-derived ``sequences`` list. Reads of length 0 have no mean score: they count
  in ``count`` and ``length`` but not here.
- An empty file (or a gzip stream with no data) is a valid FASTQ with no reads: ``count`` and
  ``bases`` are 0, ``length`` is ``[0, 0]``, ``gc`` is 0.0 and both lists are empty. Whether a
  sample may have no reads is the caller's rule, not this module's.
- Scores are Phred+33: quality characters ``!`` (0) to ``~`` (93); anything else is an error.
- Records are the standard four lines (header, sequence, ``+``, quality); ``\\r\\n`` line ends are
  accepted and blank lines at the end of the file are ignored. Anything else raises
  ``FastqError`` naming the record (1-based) and the byte offset of its first byte, counted in
  the decompressed data for gzip files.
"""

from __future__ import annotations

import inspect
import io
import operator
import os
import sys
import zlib
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from trio._file_io import AsyncIOWrapper

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_RECORD_SIZE",
    "FastqError",
    "ReadStats",
    "chunk_stats",
    "read_statistics",
]

DEFAULT_CHUNK_SIZE = 4 * 2**20
"""Bytes handed to a worker at a time: a process hop costs a few hundred µs, a 4 MiB chunk
tens of ms of work, so the hop is lost in the noise while memory stays small."""

DEFAULT_MAX_RECORD_SIZE = 64 * 2**20
"""Longest record accepted. Ultra-long nanopore reads make records of ~10 MB; a "record" of
64 MiB without its four newlines means a file that is not FASTQ, and must not be buffered
whole."""

PROGRESS_INTERVAL = 0.25
"""Least number of seconds between two progress reports (the final 1.0 is always sent)."""

_PHRED_OFFSET = 33
_PHRED_MAX = ord("~") - _PHRED_OFFSET
_GZIP_MAGIC = b"\x1f\x8b"

# Quality characters to Phred scores; any character outside '!'..'~' becomes 0xFF so that a
# single ``in`` test finds it after the translation the statistics need anyway.
_TO_PHRED = bytes(c - _PHRED_OFFSET if _PHRED_OFFSET <= c <= ord("~") else 0xFF for c in range(256))

# G and C (either case) to a byte with one bit set, anything else to 0.
_GC_BITS = bytes(1 if c in b"GCgc" else 0 for c in range(256))

RunInProcess = Callable[..., Awaitable[Any]]
RunInThread = Callable[..., Awaitable[Any]]
ProgressCallback = Callable[[float], Awaitable[None] | None]


class FastqError(ValueError):
    """The file is not valid FASTQ; ``record`` (1-based) and ``offset`` (bytes) say where."""

    def __init__(self, message: str, record: int | None = None, offset: int | None = None):
        super().__init__(message)
        self.record = record
        self.offset = offset


@dataclass(slots=True)
class ReadStats:
    """Mergeable statistics of some reads: the totals of a chunk, or of a whole file.

    Only sums and histograms are kept, so that merging two parts gives exactly the statistics
    of their union; ``as_quality`` turns them into the sample's ``quality`` document.
    """

    lengths: Counter[int] = field(default_factory=Counter)
    """Number of reads of each length."""
    gc: int = 0
    """Number of G and C bases (either case)."""
    position_sums: list[int] = field(default_factory=list)
    """Sum of the Phred scores at each 0-based position, over the reads that reach it."""
    mean_qualities: Counter[int] = field(default_factory=Counter)
    """Number of reads of each floor(mean Phred score); reads of length 0 are not counted."""

    @property
    def count(self) -> int:
        """Number of reads."""
        return sum(self.lengths.values())

    @property
    def bases(self) -> int:
        """Number of bases of all reads."""
        return sum(length * n for length, n in self.lengths.items())

    def merge(self, other: ReadStats) -> ReadStats:
        """Add ``other``'s reads to these statistics (in place) and return ``self``."""
        self.lengths.update(other.lengths)
        self.mean_qualities.update(other.mean_qualities)
        self.gc += other.gc
        self.position_sums = _add_lists(self.position_sums, other.position_sums)
        return self

    def as_quality(self) -> dict[str, Any]:
        """The sample's ``quality`` document (see the module docstring for each field)."""
        bases = self.bases
        reach = _reads_reaching(self.lengths)
        distribution = [0] * (max(self.mean_qualities, default=-1) + 1)
        for score, n in self.mean_qualities.items():
            distribution[score] = n
        return {
            "count": self.count,
            "bases": bases,
            "length": [min(self.lengths, default=0), max(self.lengths, default=0)],
            "gc": 100 * self.gc / bases if bases else 0.0,
            "mean_quality_by_position": list(map(operator.truediv, self.position_sums, reach)),
            "quality_distribution": distribution,
        }


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two lists, the shorter one padded with zeros."""
    if len(a) < len(b):
        a, b = b, a
    return list(map(operator.add, a, b)) + a[len(b) :]


def _reads_reaching(lengths: Counter[int]) -> list[int]:
    """For each 0-based position, the number of reads longer than it."""
    reach = [0] * max(lengths, default=0)
    for length, n in lengths.items():
        if length:
            reach[length - 1] += n
    for i in range(len(reach) - 2, -1, -1):
        reach[i] += reach[i + 1]
    return reach


# --- the per-chunk work, run in a worker process --------------------------------------------


def chunk_stats(
    head: bytes, data: bytes, final: bool, first_record: int, offset: int
) -> tuple[ReadStats, int]:
    """Statistics of the complete records at the start of ``head + data``.

    Pure and module-level so that it can run in a worker process. ``head`` is the previous
    chunk's unconsumed tail, passed apart so that the event loop never copies a chunk to join
    them. ``first_record`` (1-based) and ``offset`` (bytes) locate the buffer's first byte in
    the file, for error messages.

    Returns the statistics and the number of bytes consumed: the records processed end there,
    and the rest (an incomplete record) must be passed again, in front of the next data. With
    ``final`` the buffer is the end of the file: everything is consumed or ``FastqError`` is
    raised. ``FastqError`` is also raised as soon as an incomplete record is seen to be wrong.
    """
    buf = head + data if head else data
    if final:
        buf = _end_with_one_newline(buf)
    lines = buf.split(b"\n")
    complete = (len(lines) - 1) // 4
    rest = lines[4 * complete :]
    del lines[4 * complete :]
    consumed = len(buf) - (sum(map(len, rest)) + len(rest) - 1)
    stats = _records_stats(lines, b"\r" in buf, first_record, offset)
    _check_incomplete(rest, final, first_record + complete, offset + consumed)
    return stats, consumed


def _end_with_one_newline(buf: bytes) -> bytes:
    """The end of the file with one final newline, however many (or few) blank lines it had.

    A last read of length 0 ends in blank sequence and quality lines of its own: when the
    stripped text ends in such a record's '+' line, its blank quality line is given back.
    """
    stripped = buf.rstrip(b"\r\n")
    if not stripped:
        return b""
    tail = stripped.rsplit(b"\n", 2)
    last_read_is_empty = len(tail) == 3 and not tail[1].strip(b"\r") and tail[2].startswith(b"+")
    if last_read_is_empty and buf.count(b"\n", len(stripped)) >= 2:
        return stripped + b"\n\n"
    return stripped + b"\n"


def _records_stats(lines: list[bytes], crlf: bool, first_record: int, offset: int) -> ReadStats:
    """Statistics of whole records (four lines each), or ``FastqError`` for the first bad one."""
    headers, seqs, pluses, quals = lines[0::4], lines[1::4], lines[2::4], lines[3::4]
    if crlf:
        # Only the lines that are measured need their '\r' removed.
        seqs = list(map(bytes.rstrip, seqs, repeat(b"\r")))
        quals = list(map(bytes.rstrip, quals, repeat(b"\r")))
    seq_lengths = list(map(len, seqs))
    all_scores = b"".join(quals).translate(_TO_PHRED)
    if (
        not all(map(bytes.startswith, headers, repeat(b"@")))
        # Nearly always the third lines are a bare '+': one join checks them all.
        or not (
            b"".join(pluses) == b"+" * len(pluses)
            or all(map(bytes.startswith, pluses, repeat(b"+")))
        )
        or seq_lengths != list(map(len, quals))
        or b"\xff" in all_scores
    ):
        _raise_first_error(lines, first_record, offset)

    stats = ReadStats(lengths=Counter(seq_lengths), gc=_count_gc(b"".join(seqs)))
    width = _field_width(len(quals))
    position_totals = 0
    for length, group, scores in _length_groups(stats.lengths, quals, all_scores):
        if length:
            position_totals += _block_sums(scores, len(group), length, width)
            read_sums = map(operator.sub, map(sum, group), repeat(_PHRED_OFFSET * length))
            stats.mean_qualities.update(map(operator.floordiv, read_sums, repeat(length)))
    stats.position_sums = _fields(position_totals, max(stats.lengths, default=0), width)
    return stats


def _count_gc(seqs: bytes) -> int:
    """Number of G and C (either case) in ``seqs``.

    Why not ``seqs.count(b"G") + ...``: with matches this frequent its branchy loop runs at
    ~2 ns a byte, four times over; mapping G/C to a one-bit byte and counting the set bits of
    the resulting integer is branch-free and about twice as fast.
    """
    return int.from_bytes(seqs.translate(_GC_BITS), "little").bit_count()


def _length_groups(
    lengths: Counter[int], quals: list[bytes], all_scores: bytes
) -> list[tuple[int, list[bytes], bytes]]:
    """Group reads by length: ``(length, quality lines, their Phred scores joined)``.

    Reads of one length can be summed position by position as equal blocks; most files have
    one or a few lengths, so the common case reuses the scores already translated.
    """
    if len(lengths) <= 1:
        return [(length, quals, all_scores) for length in lengths]
    groups: dict[int, list[bytes]] = {}
    for qual in quals:
        groups.setdefault(len(qual), []).append(qual)
    return [(n, g, b"".join(g).translate(_TO_PHRED)) for n, g in groups.items()]


_NARROW_TERMS = 0xFFFF // _PHRED_MAX
"""Most scores that a 16-bit field can sum without overflowing."""

# array typecodes of unsigned fields of 2, 4 and 8 bytes, by size (checked at import).
_FIELD_FORMATS = {array(code).itemsize: code for code in "HILQ"}
assert {2, 4, 8} <= _FIELD_FORMATS.keys()


def _field_width(reads: int) -> int:
    """Bytes per field that hold the sum of ``reads`` scores at one position."""
    return next(w for w in (2, 4, 8) if reads * _PHRED_MAX < 1 << (8 * w))


def _block_sums(scores: bytes, blocks: int, size: int, width: int) -> int:
    """Element-wise sum of ``blocks`` consecutive blocks of ``size`` Phred scores each.

    The result is an integer whose ``width``-byte little-endian fields are the ``size`` sums.

    Why a big integer: adding bytes one by one (``sum()``, or slices ``scores[i::size]`` one
    position at a time) costs ~8 ns a byte in CPython, and per-position lists would cost far
    more for long reads. Spread into the 16-bit fields of integers, the scores of whole runs
    of blocks are added at once by CPython's big-integer addition, in C: the blocks are cut
    into at most ``_NARROW_TERMS`` pieces of equal length (so no 16-bit field can overflow),
    the pieces are added, and the blocks of that sum are widened to ``width`` and folded in
    halves into one. Most of the cost is ``int.from_bytes``, ~2 ns a score, about a third of
    summing the slices.
    """
    per_piece = -(-blocks // _NARROW_TERMS)  # blocks in each piece, rounded up
    piece_bytes = per_piece * size * 2
    spread = bytearray(2 * len(scores))
    spread[::2] = scores
    view = memoryview(spread)
    total = sum(
        int.from_bytes(view[start : start + piece_bytes], "little")
        for start in range(0, len(spread), piece_bytes)
    )
    if width != 2:
        total = _widen(total, per_piece * size, width)
    blocks = per_piece
    while blocks > 1:
        half = blocks // 2
        shift = half * size * 8 * width
        total = (total & ((1 << shift) - 1)) + (total >> shift)
        blocks -= half
    return total


def _widen(value: int, fields: int, width: int) -> int:
    """Re-encode ``fields`` 16-bit fields of ``value`` as fields of ``width`` bytes."""
    narrow = value.to_bytes(fields * 2, "little")
    wide = bytearray(fields * width)
    wide[0::width] = narrow[0::2]
    wide[1::width] = narrow[1::2]
    return int.from_bytes(wide, "little")


def _fields(value: int, fields: int, width: int) -> list[int]:
    """The first ``fields`` little-endian fields of ``width`` bytes of ``value``."""
    values = array(_FIELD_FORMATS[width], value.to_bytes(fields * width, "little"))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _raise_first_error(lines: list[bytes], first_record: int, offset: int) -> None:
    """Raise ``FastqError`` for the first bad record of whole ``lines`` (the slow path)."""
    for i in range(0, len(lines), 4):
        header, seq, plus, qual = lines[i : i + 4]
        record = first_record + i // 4
        _check_header(header, record, offset)
        _check_plus(plus, record, offset)
        seq, qual = seq.rstrip(b"\r"), qual.rstrip(b"\r")
        if len(seq) != len(qual):
            raise FastqError(
                f"record {record} (byte offset {offset}): its sequence has {len(seq)} "
                f"characters but its quality line has {len(qual)}",
                record,
                offset,
            )
        bad = qual.translate(_TO_PHRED).find(b"\xff")
        if bad >= 0:
            raise FastqError(
                f"record {record} (byte offset {offset}): quality character "
                f"{chr(qual[bad])!r} at position {bad} is not Phred+33 ('!' to '~')",
                record,
                offset,
            )
        offset += sum(map(len, lines[i : i + 4])) + 4
    raise AssertionError("no bad record found")  # pragma: no cover - the fast path said so


def _check_incomplete(rest: list[bytes], final: bool, record: int, offset: int) -> None:
    """Check the lines of an incomplete record (the last one possibly partial).

    At the end of the file any incomplete record is an error; before it, what has been read
    of one is checked now so that a file that is not FASTQ (and may have no newline at all)
    fails at once instead of being buffered. A partial line is checked only once it is longer
    than an error message quotes, so that the message does not depend on where chunks end.
    """
    # A blank line may be the first of the blank lines that can end the file.
    if rest[0] and (len(rest) > 1 or len(rest[0]) > _EXCERPT):
        _check_header(rest[0], record, offset)
    if len(rest) > 3 or (len(rest) == 3 and len(rest[2]) > _EXCERPT):
        _check_plus(rest[2], record, offset)
    if final and rest != [b""]:
        raise FastqError(
            f"record {record} (byte offset {offset}) is truncated: the file ends after "
            f"{len(rest) - 1} of its 4 lines",
            record,
            offset,
        )


def _check_header(line: bytes, record: int, offset: int) -> None:
    if not line.startswith(b"@"):
        hint = " (this looks like FASTA, not FASTQ)" if line.startswith(b">") else ""
        raise FastqError(
            f"record {record} (byte offset {offset}): expected a header line starting "
            f"with '@', found {_excerpt(line)}{hint}",
            record,
            offset,
        )


def _check_plus(line: bytes, record: int, offset: int) -> None:
    if not line.startswith(b"+"):
        raise FastqError(
            f"record {record} (byte offset {offset}): expected the third line to start "
            f"with '+', found {_excerpt(line)}",
            record,
            offset,
        )


_EXCERPT = 40  # bytes of a line quoted in an error message


def _excerpt(line: bytes) -> str:
    """A short, printable quotation of a line for an error message."""
    line = line.rstrip(b"\r")
    text = line[:_EXCERPT].decode("utf-8", "replace")
    return repr(text + "…" if len(line) > _EXCERPT else text)


# --- reading the file -----------------------------------------------------------------------


class _AsyncFile(Protocol):
    async def read(self, size: int = -1, /) -> bytes: ...


class _Source(Protocol):
    position: int
    """Bytes of the file on disk read so far."""

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of FASTQ text (``b""`` only at the end)."""
        ...


class _PlainSource:
    """An uncompressed file: its bytes as they are."""

    def __init__(self, file: _AsyncFile, first: bytes) -> None:
        self._file = file
        self._first: bytes | None = first
        self.position = len(first)

    async def read(self, limit: int) -> bytes:
        if self._first is not None:
            data, self._first = self._first, None
            return data
        data = await self._file.read(limit)
        self.position += len(data)
        return data


class _Inflater:
    """Incremental gzip decompression, multi-member, with bounded output per call.

    Used from one thread at a time: the source awaits each call before the next.
    """

    def __init__(self) -> None:
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._input = b""  # compressed bytes not yet inflated
        self._member_started = False  # bytes of the current member were inflated
        self._pieces: list[bytes] = []
        self._collected = 0

    @property
    def has_input(self) -> bool:
        return bool(self._input)

    def run(self, compressed: bytes, limit: int, at_eof: bool) -> bytes | None:
        """Inflate ``compressed`` after any input left over by the previous call.

        Returns ``limit`` bytes, or fewer at the end of the file (``b""`` once drained), or
        ``None`` when more compressed input is needed first.
        """
        self._input += compressed
        try:
            self._inflate(limit)
        except zlib.error as exc:
            raise FastqError(f"the gzip data is corrupt: {exc}") from None
        if self._collected < limit and not (at_eof and not self._input):
            return None
        if at_eof and not self._input and self._member_started:
            raise FastqError("the gzip data is truncated: the file ends inside a gzip member")
        data = b"".join(self._pieces)
        self._pieces, self._collected = [], 0
        return data

    def _inflate(self, limit: int) -> None:
        while self._collected < limit and self._input:
            if self._decompressor.eof:
                self._next_member()
                continue
            piece = self._decompressor.decompress(self._input, limit - self._collected)
            if self._decompressor.eof:
                # The bytes after the member; unconsumed_tail may hold them too (stale).
                self._input = self._decompressor.unused_data
                self._member_started = False
            else:
                self._input = self._decompressor.unconsumed_tail
                self._member_started = True
            self._pieces.append(piece)
            self._collected += len(piece)

    def _next_member(self) -> None:
        # Like gzip.GzipFile, accept zero padding between or after members.
        self._input = self._input.lstrip(b"\0")
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)


class _GzipSource:
    """A gzip-compressed file, inflated in a thread.

    Why a thread: inflating a 4 MiB chunk takes ~10-20 ms of CPU, far too long to hold the
    event loop, and slicing it into small pieces between checkpoints would still spend the
    loop's time on it. zlib releases the GIL while inflating, so a thread runs truly in
    parallel with the loop (and with the worker process busy on the previous chunk), for one
    thread hop per chunk. The call is not abandoned on cancellation: it ends within one
    bounded chunk, and the decompressor is never used by two threads.
    """

    def __init__(self, file: _AsyncFile, first: bytes, run_in_thread: RunInThread) -> None:
        self._file = file
        self._run_in_thread = run_in_thread
        self._inflater = _Inflater()
        self._pending = first
        self._eof = False
        self.position = len(first)

    async def read(self, limit: int) -> bytes:
        while True:
            compressed, self._pending = self._pending, b""
            if not compressed and not self._inflater.has_input and not self._eof:
                compressed = await self._file.read(limit)
                self.position += len(compressed)
                self._eof = not compressed
            data = await self._run_in_thread(self._inflater.run, compressed, limit, self._eof)
            if data is not None:
                return data


async def _open_source(file: _AsyncFile, chunk_size: int, run_in_thread: RunInThread) -> _Source:
    """Read the first chunk and pick the source by its magic bytes, not the file's name."""
    first = await file.read(max(chunk_size, len(_GZIP_MAGIC)))
    if first.startswith(_GZIP_MAGIC):
        return _GzipSource(file, first, run_in_thread)
    return _PlainSource(file, first)


class _Progress:
    """Throttled progress reports: at most one per ``PROGRESS_INTERVAL``, then 1.0."""

    def __init__(self, callback: ProgressCallback | None, size: int) -> None:
        self._callback = callback
        self._size = size
        self._last_time = -float("inf")
        self._last_fraction = 0.0

    async def update(self, position: int) -> None:
        fraction = min(position / self._size, 1.0) if self._size else 0.0
        now = trio.current_time()
        if fraction < 1.0 and now - self._last_time >= PROGRESS_INTERVAL:
            self._last_time = now
            await self._report(fraction)

    async def finish(self) -> None:
        await self._report(1.0)

    async def _report(self, fraction: float) -> None:
        if self._callback is None or fraction < self._last_fraction:
            return
        self._last_fraction = fraction
        result = self._callback(fraction)
        if inspect.isawaitable(result):
            await result


async def read_statistics(
    file: AsyncIOWrapper[io.BufferedReader],
    *,
    run_in_process: RunInProcess,
    run_in_thread: RunInThread = trio.to_thread.run_sync,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """The ``quality`` statistics of the FASTQ file open as ``file`` (plain or gzip-compressed),
    read from its start. The caller opens it (``trio.open_file``, or the uploads folder's
    ``open``) and closes it.

    The file is read ``chunk_size`` bytes at a time; each chunk's
    statistics are computed by ``await run_in_process(chunk_stats, ...)`` while the next chunk
    is read (and, for gzip, inflated by ``await run_in_thread(fn, *args)``). One chunk is in a
    worker at a time, since each starts with the incomplete record the previous one left: the
    memory used is a few chunks' worth (the chunk in the worker, its copy in transit, the next
    chunk), whatever the file's size. Gzip files are recognised by their magic bytes and may
    have several members.

    ``on_progress(fraction)``, sync or async, is called with non-decreasing fractions of the
    file on disk (compressed bytes for gzip) read and processed, at most every
    ``PROGRESS_INTERVAL`` seconds, and with 1.0 once the statistics are complete.

    Cancellation: cancelling the caller cancels the in-flight ``run_in_process`` call (which
    the caller's executor must kill promptly, e.g. trio-parallel's ``kill_on_cancel=True``),
    and waits for a file read or inflate call in progress (one chunk at most).

    Raises ``FastqError`` (a ``ValueError``) if the file is not FASTQ, its gzip data is corrupt
    or a record is longer than ``max_record_size``; ``OSError`` if it cannot be read.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    size = (await trio.to_thread.run_sync(os.fstat, file.fileno())).st_size
    progress = _Progress(on_progress, size)
    source = await _open_source(file, chunk_size, run_in_thread)
    totals = await _process(source, run_in_process, chunk_size, max_record_size, progress)
    await progress.finish()
    return totals.as_quality()


async def _process(
    source: _Source,
    run_in_process: RunInProcess,
    chunk_size: int,
    max_record_size: int,
    progress: _Progress,
) -> ReadStats:
    """Feed the source's chunks to workers, one at a time, reading ahead one chunk."""
    totals = ReadStats()
    records = offset = 0  # records and bytes consumed so far
    head = b""
    data = await source.read(chunk_size)
    while data:
        position = source.position
        results: list[tuple[ReadStats, int]] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_work, results, run_in_process, head, data, records + 1, offset)
                # While a record longer than a chunk is incomplete, each read is as long as
                # what is buffered, so that the buffer doubles and the worker re-splits it
                # only a logarithmic number of times.
                next_data = await source.read(max(chunk_size, len(head)))
        except BaseExceptionGroup as group:
            raise _sole_error(group) from None
        stats, consumed = results[0]
        totals.merge(stats)
        records, offset = records + stats.count, offset + consumed
        head = _unconsumed(head, data, consumed)
        if len(head) > max_record_size:
            raise FastqError(
                f"record {records + 1} (byte offset {offset}) is longer than "
                f"{max_record_size} bytes: this is not a FASTQ file, or not one of 4-line "
                "records",
                records + 1,
                offset,
            )
        await progress.update(position)
        data = next_data
    if head:
        stats, _ = await run_in_process(chunk_stats, head, b"", True, records + 1, offset)
        totals.merge(stats)
    return totals


async def _work(
    results: list[tuple[ReadStats, int]],
    run_in_process: RunInProcess,
    head: bytes,
    data: bytes,
    first_record: int,
    offset: int,
) -> None:
    results.append(await run_in_process(chunk_stats, head, data, False, first_record, offset))


def _sole_error(group: BaseExceptionGroup) -> BaseException:
    """The one error in ``group`` besides cancellations, else the group itself.

    The nursery that overlaps reading with a worker is an implementation detail: callers
    should catch ``FastqError`` or ``OSError``, not an exception group.
    """
    errors = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    return errors[0] if len(errors) == 1 else group


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [
        leaf
        for e in group.exceptions
        for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    ]


def _unconsumed(head: bytes, data: bytes, consumed: int) -> bytes:
    """What is left of ``head + data`` after ``consumed`` bytes, joining only if need be."""
    if consumed >= len(head):
        return data[consumed - len(head) :]
    return head[consumed:] + data
