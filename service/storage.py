"""Artifact store on a local (or shared) directory: atomic writes, content hashes, paths kept inside the root."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024


class StorageError(ValueError):
    """A relative path that escapes the store, or a file that is not there."""


@dataclass(frozen=True)
class StoredFile:
    """Where a file went (relative to the store root), its hash and size."""

    path: str
    sha256: str
    size_bytes: int


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Files under one root directory, addressed by relative POSIX paths."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def resolve(self, rel_path: str) -> Path:
        """Absolute path of `rel_path`; StorageError if it would leave the root."""
        rel = PurePosixPath(rel_path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise StorageError(f"artifact path {rel_path!r} must be relative and inside the store")
        return self.root.joinpath(*rel.parts)

    def temp_file(self, suffix: str = "") -> Path:
        """A new empty file inside the store (same filesystem, so a later rename is atomic)."""
        tmp_dir = self.root / ".tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=suffix)
        os.close(fd)
        return Path(name)

    def put_file(self, src: str | Path, rel_path: str) -> StoredFile:
        """Copy `src` to `rel_path` atomically (temp file, fsync, rename); replaces an existing file."""
        with open(src, "rb") as fin:
            return self.put_stream(fin, rel_path)

    def put_stream(self, stream: BinaryIO, rel_path: str, max_bytes: int | None = None) -> StoredFile:
        """Write a stream to `rel_path` atomically; StorageError (and nothing kept) past `max_bytes`."""
        tmp = self.temp_file()
        try:
            digest, size = hashlib.sha256(), 0
            with open(tmp, "wb") as fout:
                while chunk := stream.read(CHUNK_BYTES):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise StorageError(f"file is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            return self._commit(tmp, rel_path, digest.hexdigest(), size)
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(self, tmp: Path, rel_path: str) -> StoredFile:
        """Move a finished temp file from temp_file() to `rel_path` atomically."""
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return self._commit(tmp, rel_path, sha256_file(tmp), tmp.stat().st_size)

    def _commit(self, tmp: Path, rel_path: str, sha256: str, size: int) -> StoredFile:
        dest = self.resolve(rel_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return StoredFile(rel_path, sha256, size)

    def exists(self, rel_path: str) -> bool:
        """Whether `rel_path` is a file in the store."""
        return self.resolve(rel_path).is_file()

    def delete(self, rel_path: str) -> None:
        """Remove a file if present."""
        self.resolve(rel_path).unlink(missing_ok=True)

    def delete_tree(self, rel_path: str) -> None:
        """Remove a directory and everything under it, if present."""
        shutil.rmtree(self.resolve(rel_path), ignore_errors=True)

    def verify(self, stored_path: str, sha256: str) -> bool:
        """Whether the file at `stored_path` exists and has hash `sha256`."""
        path = self.resolve(stored_path)
        return path.is_file() and sha256_file(path) == sha256
