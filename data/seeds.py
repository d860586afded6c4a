"""One way to derive a seed from names and numbers (shard job, loader, synthetic rooms, instruction sets).

`derive_seed(7, "scan", "scene_0001")` is a stable 63-bit integer: the first 8 bytes of the
sha256 of the parts joined by "|", so it does not depend on Python's hash randomisation, the
platform or the process, and any change of a part gives an unrelated seed.
"""
from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from parts (independent of Python's hash randomisation)."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1
