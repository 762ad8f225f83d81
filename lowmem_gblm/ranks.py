"""The processes of one run: torch.distributed under ``torchrun`` or ``accelerate launch``, nothing without.

The launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (accelerate launch runs
torch's elastic launcher for multi-process jobs); with WORLD_SIZE > 1 the default process group is
created here, backend gloo for CPU runs and nccl for CUDA (each rank on its LOCAL_RANK GPU). Rank 0 is
the *writer*: it alone touches OUT_DIR (lock, shards, manifest, report, gradient files); the others
compute on their windows and send it what it needs.

Every collective has a timeout (``LOWMEM_GBLM_RANK_TIMEOUT`` seconds, default 1800): a rank that dies
or hangs makes the others fail within it, never wait forever. On such a failure the survivors ask the
launcher's store which ranks still answer, and say which did not (a rank that failed on its own error
leaves its message there first).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowmem_gblm.errors import UsageError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "LOWMEM_GBLM_RANK_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # longer than any step between two collectives (a block's SparseGPT on the writer)
_ASK_S = 5.0  # how long survivors wait for each other's answer when diagnosing a failure


class RankFailure(UsageError):
    """Another rank died, hung past the timeout, or failed: this rank stops (nothing durable is lost)."""


def env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from exc


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError as exc:
        raise UsageError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from exc
    if value <= 0:
        raise UsageError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text}")
    return value


@dataclass
class Ranks:
    """This process's place in the run: ``rank`` of ``world``; ``writer`` is rank 0."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    wire: torch.device | None = None  # nccl moves CUDA tensors only: host tensors cross through this GPU

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """Each rank's own GPU (LOCAL_RANK) for a CUDA run; the CPU is shared."""
        if self.many and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # -- collectives (all no-ops in a one-process run) --------------------------------------------

    @contextlib.contextmanager
    def talking(self, what: str):
        """Wrap collectives: a lost or failed peer becomes a RankFailure naming the ranks that did not answer."""
        try:
            yield
        except RankFailure:
            raise
        except Exception as exc:  # gloo/nccl raise RuntimeError subclasses (DistBackendError, ...)
            if not self.many:
                raise
            raise RankFailure(f"{what} failed: {self._diagnose()} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc

    def _diagnose(self) -> str:
        store = _store()
        if store is None:
            return "another rank stopped answering"
        try:
            failed = {}
            for r in range(self.world):
                if r != self.rank and store.check([f"lowmem/failed/{r}"]):
                    failed[r] = store.get(f"lowmem/failed/{r}").decode(errors="replace")
            if failed:
                return "; ".join(f"rank {r} failed: {msg}" for r, msg in sorted(failed.items()))
            store.set(f"lowmem/alive/{self.rank}", "1")
            deadline = time.monotonic() + _ASK_S
            missing = [r for r in range(self.world) if r != self.rank]
            while missing and time.monotonic() < deadline:
                missing = [r for r in missing if not store.check([f"lowmem/alive/{r}"])]
                time.sleep(0.2)
            if missing:
                return f"rank(s) {', '.join(map(str, missing))} did not answer (killed, crashed or hung)"
            return "every rank still answers; a collective timed out or a connection broke"
        except Exception:  # noqa: BLE001 (the store itself is gone: its host died)
            return "the launcher's store is gone (the launcher or rank 0's host died)"

    def record_failure(self, message: str) -> None:
        """Leave this rank's error in the launcher's store, so the others can name it."""
        store = _store() if self.many else None
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(f"lowmem/failed/{self.rank}", message[:2000])

    def broadcast_object(self, obj, what: str = "a broadcast from rank 0"):
        """The writer's ``obj`` on every rank (pickled)."""
        if not self.many:
            return obj
        box = [obj]
        with self.talking(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_objects(self, obj, what: str = "an exchange between ranks") -> list:
        """[every rank's ``obj``] by rank, on every rank."""
        if not self.many:
            return [obj]
        out = [None] * self.world
        with self.talking(what):
            dist.all_gather_object(out, obj)
        return out

    def on_writer(self, work, what: str):
        """``work()`` on the writing rank only, then every rank agrees on how it went (``agree``): a UsageError
        there is raised on every rank. Returns what ``work`` returned on the writer, None on the other ranks."""
        result, error = None, None
        if self.writer:
            try:
                result = work()
            except UsageError as exc:
                error = exc
        self.agree(error, what)
        return result

    def agree(self, error: Exception | None, what: str) -> None:
        """Every rank reports whether ``what`` worked for it; if one failed, all raise its error (the writer's
        message first), so a refusal on one rank never leaves the others waiting."""
        errors = self.all_objects(None if error is None else (type(error).__name__, str(error)), what)
        if error is not None:
            raise error
        for r, e in enumerate(errors):
            if e is not None:
                raise RankFailure(f"rank {r}: {what}: {e[1]}") if e[0] not in _USER_ERRORS \
                    else UsageError(f"rank {r}: {e[1]}")

    def _on_wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.wire) if self.wire is not None and t.device != self.wire else t

    def send(self, t: torch.Tensor, dst: int, what: str) -> None:
        with self.talking(what):
            dist.send(_bytes(self._on_wire(t.contiguous())), dst)

    def recv(self, t: torch.Tensor, src: int, what: str) -> None:
        with self.talking(what):
            box = self._on_wire(t)
            dist.recv(_bytes(box), src)
            if box is not t:
                t.copy_(box)

    def broadcast_(self, tensors: list[torch.Tensor], what: str) -> None:
        """The writer's values of ``tensors`` copied into every rank's (same shapes and dtypes), exactly."""
        if not self.many:
            return
        with self.talking(what):
            for t in tensors:
                box = self._on_wire(t.contiguous())
                dist.broadcast(_bytes(box), src=0)
                if box is not t:
                    t.copy_(box)

    def barrier(self, what: str) -> None:
        if self.many:
            with self.talking(what):
                dist.barrier()


_USER_ERRORS = {"UsageError", "InputError", "ResumeMismatch", "OutOfSpace"}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as its raw bytes (any dtype crosses the wire exactly, gloo included)."""
    if not t.is_contiguous():
        raise ValueError("only contiguous tensors cross between ranks")
    return t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None


_CURRENT: Ranks | None = None


def current(device_type: str = "cpu") -> Ranks:
    """This process's Ranks; the first call under a launcher (WORLD_SIZE > 1) creates the process group."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = env_world()
    if world <= 1:
        _CURRENT = Ranks()
        return _CURRENT
    timeout = _timeout_s()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    _CURRENT = Ranks(rank, world, local, timeout, torch.device("cuda", local) if backend == "nccl" else None)
    log.info("rank %d of %d (local rank %d), backend %s, collective timeout %g s", rank, world, local, backend,
             timeout)
    return _CURRENT


def local_world() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher); no process group needed."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def close() -> None:
    """Leave the process group (at exit), so the launcher sees a clean end."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _CURRENT = None


def failed_rank(message: str) -> None:
    """This rank is failing with ``message``: leave it where the other ranks look (if there are any)."""
    if _CURRENT is not None and _CURRENT.many:
        _CURRENT.record_failure(message)
