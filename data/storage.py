"""Storage helpers: local paths and s3:// (or any fsspec URL) through one code path.

Every module that reads or writes shards, manifests, scenes or small JSON files goes
through these, so "is this local?", "read this JSON if it exists" and "hash this file"
have one answer each.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec


def public_url(url: str | None) -> str | None:
    """A URL without credentials: `user:password@` is dropped from the host, and the query string
    (presigned tokens) from the path. Local paths come back unchanged."""
    if not url or "://" not in url:
        return url
    proto, rest = url.split("://", 1)
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = host.rsplit("@", 1)[1]
    return proto + "://" + host + slash + path.split("?", 1)[0]


def url_join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    out = root.rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path or URL (s3:// through s3fs)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def fresh_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fs, path) with any cached listing of `url` dropped (s3fs caches listings per process)."""
    fs, path = open_fs(url)
    if not is_local(fs):
        fs.invalidate_cache(path)
    return fs, path


def read_bytes(url: str) -> bytes:
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str) -> Any | None:
    """The parsed JSON at url, or None when there is none."""
    fs, path = fresh_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
