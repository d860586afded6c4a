"""Process group set-up, rank-0 helpers and the SIGTERM flag (one place; every entry point uses it).

Imports torch lazily: `launch/train.py` installs the SIGTERM flag and checks its flags
before anything heavy is imported.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("gasp.dist")
_sigterm = {"received": False, "installed": False}


def install_sigterm_flag() -> Any:
    """From now on SIGTERM only sets a flag (`sigterm_received()`); the trainer checkpoints and exits 0.

    Installed first thing by the entry point, so a rank signalled during its start (the
    launcher stops all ranks when one fails its config check) still ends cleanly: it
    finishes its check and reports it. Returns the previous handler (to restore).
    Main thread only; a no-op elsewhere.
    """
    def handler(signum, frame) -> None:
        _sigterm["received"] = True
        log.warning("SIGTERM received: checkpointing at the next step boundary, then exiting")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None
    _sigterm["installed"] = True
    return previous


def restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    _sigterm["received"] = False
    _sigterm["installed"] = False


def sigterm_received() -> bool:
    return _sigterm["received"]


def env_rank() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (1 process if unset)."""
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    return rank, local, world


def init_distributed(timeout_min: float = 30.0) -> tuple[int, int, "torch.device"]:
    """Start the process group (no-op when already up); returns (rank, world, device).

    Sets the CUDA device before `init_process_group` (nccl on GPUs, gloo on CPU). A
    bare `python launch/train.py` becomes a 1-process group on 127.0.0.1.
    """
    import torch
    import torch.distributed as dist

    rank, local, world = env_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if dist.is_available() and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        import deepspeed

        if device.type == "cpu":
            clear_stale_build_lock()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(minutes=timeout_min), verbose=False)
        release_shm_buffer_at_exit()
    return dist.get_rank(), dist.get_world_size(), device


SHM_OP = "deepspeed_shm_comm"
"""The C++ op DeepSpeed JIT-builds on CPU at `init_distributed` (its CPU all-reduce), cached under
torch's extensions folder (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)."""
STALE_LOCK_S = 600.0


def clear_stale_build_lock(name: str = SHM_OP, max_age_s: float = STALE_LOCK_S) -> str | None:
    """Remove the JIT build's `lock` file when it is older than `max_age_s`; returns its path if removed.

    torch builds an extension under a lock file that every other process waits on until it disappears.
    A process killed during the ~30 s build (a timeout, a preemption, Ctrl-C) leaves the lock behind and
    every later run then waits in `init_distributed` forever, silently. A build takes well under
    `max_age_s`, so an older lock has no owner.
    """
    import time

    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        age = time.time() - os.path.getmtime(lock)
    except (ImportError, OSError):
        return None
    if age < max_age_s:
        return None
    try:
        os.unlink(lock)
    except FileNotFoundError:
        return None
    print(f"[dist] removed a stale build lock {lock} ({age / 60:.0f} min old, left by a process killed while "
          f"building DeepSpeed's {name} op); the op is rebuilt", file=sys.stderr)
    return lock


SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""DeepSpeed's CPU all-reduce workspace (ops/csrc/cpu/comm/shm.cpp): one ~66 MB shared-memory file per
rank and run, named by MASTER_ADDR / MASTER_PORT and the rank, which DeepSpeed never unlinks: on a CPU
machine every run left 2 x 66 MB in /dev/shm (RAM) until Ray's OOM killer stopped the next jobs."""
_shm_buffers: set[str] = set()


def release_shm_buffer_at_exit() -> str | None:
    """Unlink this rank's DeepSpeed shm buffer at teardown or interpreter exit; returns its path.

    Call right after the process group starts (the name needs MASTER_ADDR / MASTER_PORT then).
    Unlinking only removes the name: other ranks' mappings stay valid. A SIGKILLed rank still
    leaves its file behind.
    """
    import atexit

    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and _up()):
        return None
    path = SHM_BUFFER.format(uid=os.getuid(), addr=addr, port=port, rank=dist.get_rank())
    if path not in _shm_buffers:
        _shm_buffers.add(path)
        atexit.register(_unlink_shm, path)
    return path


def _unlink_shm(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        print(f"[dist] could not remove {path}: {e}", file=sys.stderr)
    _shm_buffers.discard(path)


def _up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    import torch.distributed as dist

    return not _up() or dist.get_rank() == 0


def print0(*args: Any, **kw: Any) -> None:
    if is_main():
        print(*args, **kw, flush=True)


def all_reduce(t: "torch.Tensor", op: str = "sum") -> "torch.Tensor":
    """In-place all-reduce (sum or max) when a process group is up; returns t."""
    import torch.distributed as dist

    if _up() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if _up() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (a list in rank order) on every rank."""
    import torch.distributed as dist

    if _up() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def teardown() -> None:
    if _up():
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception:
            pass
    for path in list(_shm_buffers):
        _unlink_shm(path)
