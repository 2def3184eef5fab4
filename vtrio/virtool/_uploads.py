"""The uploads folder: the reads files that samples name, and nothing outside it.

A name is taken relative to the uploads folder. Absolute names, ``..``, backslashes, NUL bytes
and symlinks that lead out of the folder are refused, as are files that are missing, not regular,
empty, or not FASTQ (plain or gzip). File access runs in worker threads (``trio.Path``,
``trio.wrap_file``, ``trio.to_thread``), never on the event loop.

A file is judged by what was opened, not by its name: it is opened without blocking
(``O_NONBLOCK``, so a FIFO or a device swapped in under its name cannot hang the open) and
refused unless the open descriptor is a regular file (``fstat``). Checking the name and then
opening it would leave a window in which the file could be swapped.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import trio

from vtrio.framework import Collection, DuplicateKey

if TYPE_CHECKING:  # trio's file wrapper is public in behaviour, not in name
    from trio._file_io import AsyncIOWrapper

GZIP_MAGIC = b"\x1f\x8b"
_SNIFF = 4096


class UploadError(ValueError):
    """A reads file name that cannot be used; the message says why."""


class Uploads:
    """The reads files in ``folder``."""

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
        async with await open_regular(path, name) as file:
            await _check_fastq(file, name)
        return path

    async def open(self, name: str) -> AsyncIOWrapper[io.BufferedReader]:
        """The FASTQ file ``name`` names, open for reading (see :meth:`resolve`).

        Resource handling: the caller closes it (``async with``).
        """
        path = await self.resolve(name)
        file = await open_regular(path, name)
        try:
            await _check_fastq(file, name)
            await file.seek(0)
        except BaseException:
            with trio.CancelScope(shield=True):
                await file.aclose()
            raise
        return file

    @staticmethod
    def normalized(name: str) -> str:
        """The form of a valid ``name`` that a sample stores: ``./a//b.fq`` is ``a/b.fq``."""
        return PurePosixPath(name).as_posix()

    async def list(self) -> list[dict[str, Any]]:
        """Every regular file directly in the folder (symlinks, folders and dot files left out),
        with its size in bytes and its modification time, by name. One worker thread does the
        scan."""
        return await trio.to_thread.run_sync(_scan, Path(self.folder))


def _scan(folder: Path) -> list[dict[str, Any]]:
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            if stat.S_ISREG(info.st_mode) and not entry.name.startswith("."):
                modified = datetime.fromtimestamp(info.st_mtime, UTC)
                files.append({"name": entry.name, "size": info.st_size, "modified_at": modified})
    return sorted(files, key=lambda file: file["name"])


async def open_regular(path: trio.Path, name: str) -> AsyncIOWrapper[io.BufferedReader]:
    """``path`` open for reading, if what it names is a regular file; UploadError otherwise.

    Never blocks: the open is non-blocking (a FIFO without a writer would block a plain open
    forever, and its thread with it), and the descriptor is checked before anything is read.
    """
    try:
        raw = await trio.to_thread.run_sync(_open_regular, os.fspath(path))
    except OSError as exc:
        raise UploadError(f"{_show(name)} cannot be read: {_reason(exc)}") from None
    if raw is None:
        raise UploadError(f"{_show(name)} is not a regular file in uploads/")
    return trio.wrap_file(raw)


def _open_regular(path: str) -> io.BufferedReader | None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)  # a regular file never blocks; reads expect blocking mode
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


async def _check_fastq(file: AsyncIOWrapper[io.BufferedReader], name: str) -> None:
    try:
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


MARKER = ".vtrio-uploads"
"""The file that names an uploads folder; MongoDB keeps the name of the one its instances use."""


class UploadsMismatch(Exception):
    """This instance's uploads folder is not the one the others on its database use."""


@asynccontextmanager
async def open_uploads(folder: Path, settings: Collection) -> AsyncIterator[Uploads]:
    """The uploads folder as a service, for the block: made if missing, and checked to be the
    folder every instance on this database uses (their jobs read each other's files).

    The first instance on a database names the folder: it places a marker in the folder (an
    atomic link, so instances starting at once agree on one) and then records it in MongoDB
    (``settings``), whose record is the one that counts. Because the marker is placed before it
    is recorded, a folder whose marker is missing while MongoDB has a record is not the
    shared folder.

    Error handling: raises UploadsMismatch, saying how to fix it, if this folder's marker and
    the one MongoDB keeps differ, or the folder has none while MongoDB has one.
    """
    uploads = trio.Path(folder)
    await uploads.mkdir(parents=True, exist_ok=True)
    record = await settings.find_one({"_id": "uploads"})
    mine = await _marker(uploads)  # read after the record: a recorded marker is in place
    if record is None:
        mine = mine or await _place_marker(uploads, secrets.token_hex(8))
        try:
            await settings.insert_one({"_id": "uploads", "marker": mine})
        except DuplicateKey:  # another instance recorded one meanwhile
            record = await settings.find_one({"_id": "uploads"})
    theirs = mine if record is None else record.get("marker")
    if mine != theirs:
        raise UploadsMismatch(_mismatch(uploads, mine, theirs))
    yield Uploads(uploads)


async def _marker(folder: trio.Path) -> str | None:
    try:
        return (await (folder / MARKER).read_text()).strip() or None
    except FileNotFoundError:
        return None


async def _place_marker(folder: trio.Path, candidate: str) -> str:
    """The folder's marker: ``candidate``, unless another instance placed one first. The
    marker appears whole or not at all (a link to a file already written)."""
    written = folder / f"{MARKER}.{candidate}"
    await written.write_text(candidate)
    try:
        await (folder / MARKER).hardlink_to(written)
    except FileExistsError:
        pass
    finally:
        await written.unlink()
    placed = await _marker(folder)
    if placed is None:
        raise UploadsMismatch(f"{folder / MARKER} was removed as it was being placed")
    return placed


def _mismatch(folder: trio.Path, mine: str | None, theirs: Any) -> str:
    found = f"its marker is {mine!r}" if mine else "it has no marker"
    return (
        f"the uploads folder {folder} is not the one the other instances on this database use "
        f"({found}; theirs is {theirs!r}): point --uploads-dir at the shared folder, or, if "
        f"this is it, write {theirs!r} into {folder / MARKER}"
    )
