"""The uploads folder: the reads files that samples name, and nothing outside it.

A name is taken relative to ``DATA_DIR/uploads``. Absolute names, ``..``, and symlinks that lead
out of the folder are refused, as are files that are missing, not regular, or not FASTQ (plain
or gzip). All file access goes through ``trio.Path`` and ``trio.open_file``.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from pathlib import PurePosixPath
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
        """The FASTQ file ``name`` names inside the folder. Raises UploadError otherwise."""
        relative = PurePosixPath(name)
        if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name:
            raise UploadError(
                f"{name!r} is not a file name inside uploads/: use a relative name without '..'"
            )
        root = await self.folder.resolve()
        path = await (root / relative).resolve()
        if not path.is_relative_to(root):
            raise UploadError(f"{name!r} leads outside uploads/ (through a symlink)")
        if not await path.is_file():
            raise UploadError(f"no file {name!r} in uploads/: upload it first")
        await _check_fastq(path, name)
        return path

    async def list(self) -> list[dict[str, Any]]:
        """Every regular file directly in the folder, with its size and modification time."""
        files = []
        for path in sorted(await self.folder.iterdir()):
            stat = await path.lstat()
            if await path.is_file() and not await path.is_symlink():
                modified = datetime.fromtimestamp(stat.st_mtime, UTC)
                files.append({"name": path.name, "size": stat.st_size, "modified_at": modified})
        return files


async def _check_fastq(path: trio.Path, name: str) -> None:
    async with await trio.open_file(path, "rb") as file:
        head = await file.read(_SNIFF)
    if head.startswith(GZIP_MAGIC):
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 1)
        except zlib.error:
            raise UploadError(f"{name!r} is not a readable gzip file") from None
    if not head.startswith(b"@"):
        raise UploadError(f"{name!r} is not FASTQ: a FASTQ file starts with '@'")
