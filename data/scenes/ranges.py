"""Byte ranges of one large container file (a ScanNet `.sens`, a ScanNet++ `depth.bin`), local or s3://.

The readers of container files build an index of where each frame's bytes lie in ONE
sequential pass (`RangeFile.stream`), keep it with the scene (it pickles into the shard
job's scene shell), and then read only the frames they need (`RangeFile.read`):

- local files: `os.pread` on a descriptor opened once per process (no shared seek state);
- object stores: one ranged GET per read (`fs.cat_file(path, start, end)`), except that a
  read which starts at most `SEQUENTIAL_GAP` bytes after the previous one ended (the scan
  walks frames in file order) goes through one read-ahead stream (fsspec's `readahead`
  cache, `STREAM_BLOCK` bytes a request), so a sequential pass costs a few large requests
  instead of one request per frame, and a write task's scattered frames one request each.

Handles are opened lazily and never pickled.
"""
from __future__ import annotations

import os
from typing import Any

from data.storage import is_local, open_fs

STREAM_BLOCK = 8 << 20  # bytes a read-ahead request fetches on an object store
SEQUENTIAL_GAP = 1 << 16  # a read this close after the previous one continues the stream


class RangeFile:
    """Reads of byte ranges of one file, local or remote (see module docstring)."""

    def __init__(self, url: str, size: int | None = None):
        self.url = url
        self._size = size
        self._fs = self._path = self._fd = self._stream = None
        self._local = False
        self._last_end: int | None = None
        self.requests = 0  # ranged GETs issued (remote; the read-ahead stream's own fetches not counted)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["size"])

    def _open_fs(self) -> None:
        if self._fs is None:
            self._fs, self._path = open_fs(self.url)
            self._local = is_local(self._fs)

    @property
    def size(self) -> int:
        """File size in bytes (one metadata request on an object store, then remembered)."""
        if self._size is None:
            self._open_fs()
            self._size = int(self._fs.size(self._path))
        return self._size

    def stream(self):
        """A binary file object for one sequential pass (a context manager; the caller closes it)."""
        self._open_fs()
        if self._local:
            return open(self._path, "rb", buffering=1 << 20)
        return self._fs.open(self._path, "rb", cache_type="readahead", block_size=STREAM_BLOCK)

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes from `offset`; EOFError (with the byte counts) if the file ends first."""
        self._open_fs()
        if size <= 0:
            return b""
        if self._local:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDONLY)
            chunks, got = [], 0
            while got < size:
                b = os.pread(self._fd, size - got, offset + got)
                if not b:
                    break
                chunks.append(b)
                got += len(b)
            data = b"".join(chunks)
        else:
            sequential = self._last_end is not None and 0 <= offset - self._last_end <= SEQUENTIAL_GAP
            if sequential:
                if self._stream is None:
                    self._stream = self.stream()
                self._stream.seek(offset)
                data = self._stream.read(size)
            else:
                self.requests += 1
                data = self._fs.cat_file(self._path, start=offset, end=offset + size)
        self._last_end = offset + len(data)
        if len(data) != size:
            raise EOFError(f"{self.url} ends at byte {offset + len(data)}, inside a record of {size} bytes "
                           f"at offset {offset}")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._last_end = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
