"""The uploads folder: the reads files that samples name, and nothing outside it.

A name is taken relative to ``DATA_DIR/uploads``. Absolute names, ``..``, backslashes, NUL bytes
and symlinks that lead out of the folder are refused, as are files that are missing, not regular,
empty, or not FASTQ (plain or gzip). File access runs in worker threads (``trio.Path``,
``trio.open_file``, ``trio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import os
import stat
import zlib
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import trio

GZIP_MAGIC = b"\x1f\x8b"
_SNIFF = 4096


class UploadError(ValueError):
    """A reads file name that cannot be used; the message says why."""


class Uploads:
    def __init__(self, folder: trio.Path) -> None:
        self.folder = folder

    async def resolve(self, name: str) -> trio.Path:
        """The FASTQ file ``name`` names inside the folder, with every symlink resolved.

        Raises UploadError, saying why, for any name that does not lead to a non-empty plain or
        gzip FASTQ file inside the folder. Cancellation: abandons nothing; a file check in a
        worker thread finishes first (it is a few system calls).
        """
        relative = PurePosixPath(name)
        if (
            not name
            or relative.is_absolute()
            or ".." in relative.parts
            or "\\" in name
            or "\0" in name
        ):
            raise UploadError(
                f"{_show(name)} is not a file name inside uploads/: "
                "use a relative name without '..'"
            )
        try:
            root = await self.folder.resolve()
            # strict: a missing file, or a symlink loop, is an error rather than a guess.
            path = await (root / relative).resolve(strict=True)
        except FileNotFoundError:
            raise UploadError(f"no file {_show(name)} in uploads/: upload it first") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
            raise UploadError(f"{_show(name)} cannot be used: {_reason(exc)}") from None
        if not path.is_relative_to(root):
            raise UploadError(f"{_show(name)} leads outside uploads/ (through a symlink)")
        if not await path.is_file():
            raise UploadError(f"{_show(name)} is not a regular file in uploads/")
        await _check_fastq(path, name)
        return path

    @staticmethod
    def normalized(name: str) -> str:
        """The form of a valid ``name`` that a sample stores: ``./a//b.fq`` is ``a/b.fq``."""
        return PurePosixPath(name).as_posix()

    async def list(self) -> list[dict[str, Any]]:
        """Every regular file directly in the folder (symlinks and folders left out), with its
        size in bytes and its modification time, by name. One worker thread does the scan."""
        return await trio.to_thread.run_sync(_scan, Path(self.folder))


def _scan(folder: Path) -> list[dict[str, Any]]:
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            if stat.S_ISREG(info.st_mode):
                modified = datetime.fromtimestamp(info.st_mtime, UTC)
                files.append({"name": entry.name, "size": info.st_size, "modified_at": modified})
    return sorted(files, key=lambda file: file["name"])


async def _check_fastq(path: trio.Path, name: str) -> None:
    try:
        async with await trio.open_file(path, "rb") as file:
            head = await file.read(_SNIFF)
    except OSError as exc:
        raise UploadError(f"{_show(name)} cannot be read: {_reason(exc)}") from None
    if not head:
        raise UploadError(f"{_show(name)} is empty: a sample needs reads")
    if head.startswith(GZIP_MAGIC):
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 1)
        except zlib.error:
            raise UploadError(f"{_show(name)} is not a readable gzip file") from None
    if not head.startswith(b"@"):
        raise UploadError(f"{_show(name)} is not FASTQ: a FASTQ file starts with '@'")


def _show(name: str) -> str:
    """The name for an error message, clipped: the message must stay readable."""
    return repr(name if len(name) <= 100 else name[:100] + "...")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)
