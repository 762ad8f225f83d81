"""One resumable-folder type, for the prune output folder and the gradient folder alike.

A run folder has a JSON state file (written atomically) holding the run's identity, the entries done
so far (each with its file, size and sha256, written only after the file is durable) and a complete
flag. A rerun with the same identity continues from the entries done; another identity is refused
with the differences named.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

from lowmem_gblm.errors import InputError, OutOfSpace, ResumeMismatch
from lowmem_gblm.io.writer import TMP_MARK, atomic_write_text
from lowmem_gblm.testing_hooks import crash_point

STATE_DIR = ".lowmem"  # inside a run folder: lock, temporary stores, the prune manifest
MANIFEST_NAME = "manifest.json"  # the prune output folder's state file (under STATE_DIR)
GRADIENTS_JSON = "gradients.json"  # a gradient folder's state file
CALIB_IDS_NAME = "calibration_ids.safetensors"  # the windows a run used, beside its outputs
CALIB_PIXELS_NAME = "calibration_pixels.safetensors"  # the images (and labels) a vision run used
REPORT_NAME = "prune_report.json"
OWN_GRADIENTS = "gradients"  # a GBLM prune run's own gradient folder, under STATE_DIR


CPU_THREADS = "cpu_threads"  # identity field: torch's CPU threads per process (every rank's) on a CPU run
# why an identity field that is no option differs, and how to match it
IDENTITY_HINTS = {CPU_THREADS: "The CPU thread count per process decides how float sums are split, so the bytes "
                               "depend on it: set OMP_NUM_THREADS to the run's count (torchrun sets 1 per rank)."}


def thread_identity(threads: list[int]) -> int | list[int]:
    """Every rank's CPU thread count, as recorded: one number when the ranks agree, else the list by rank."""
    return threads[0] if len(set(threads)) == 1 else list(threads)


def with_defaults(recorded: dict, current: dict, fields: tuple[str, ...]) -> dict:
    """``recorded`` with ``current``'s value for each of ``fields`` it lacks: an identity written before those
    fields were recorded resumes as it did then."""
    return recorded | {k: current[k] for k in fields if k in current and k not in recorded}


def diff_dicts(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts ("alpha: 100 -> 10")."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_dicts(a, b, prefix + key + ".")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class RunState:
    """``folder``/``name``: {"identity": {...}, "done": {key: {"file", "sha256", "size", ...}}, "complete"}."""

    def __init__(self, folder: Path, name: str, data: dict):
        self.folder, self.name, self.data = Path(folder), name, data
        # fault-injection point of its writes (testing_hooks): the manifest's own, else a plain write
        self.point = "manifest_write" if name.endswith(MANIFEST_NAME) else "write"

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @property
    def identity(self) -> dict:
        return self.data["identity"]

    @property
    def done(self) -> dict[str, dict]:
        return self.data["done"]

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @classmethod
    def load(cls, folder: Path, name: str) -> RunState | None:
        """The state in ``folder``, or None when there is none. One that is there but damaged (not JSON, ``done``
        not a mapping of entries with file, size and sha256) is refused: which files are the run's is then
        unknown, so the folder is neither resumed nor overwritten."""
        path = Path(folder) / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            problem = state_problem(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            problem = str(exc)
        if problem:
            raise InputError(f"{path} is damaged ({problem}): which files are this run's is unknown, so it is "
                             "neither resumed nor overwritten; move the folder aside or choose another one")
        return cls(folder, name, data)

    @classmethod
    def open(cls, folder: Path, name: str, identity: dict, *, what: str, fix: str,
             own: tuple[str, ...] = (STATE_DIR,), older=None) -> RunState:
        """Resume the run in ``folder`` if its identity matches, start one in an empty folder, refuse else.

        ``what`` names the folder in messages ("OUT_DIR", "gradient folder"); ``fix`` says what to do on a
        mismatch; ``own``: entries an empty folder may already hold (the state folder, ids written early);
        ``older``: the recorded identity -> this version's terms (fields older versions recorded or lacked).
        """
        cls.refuse_foreign(folder, name, what, own)
        state = cls.load(folder, name)
        if state is None:
            state = cls(folder, name, {"identity": identity, "done": {}, "complete": False})
            state.save()
            return state
        recorded = older(state.identity) if older is not None else state.identity
        if recorded != identity:
            diffs = diff_dicts(recorded, identity)
            changed = sorted({d.split(":")[0].removeprefix("model.") for d in diffs if d.startswith("model.")})
            if changed:
                raise ResumeMismatch(f"the input model changed since the run in {folder} started "
                                     f"({', '.join(changed[:3])} differs in size, time or header); restore it, or "
                                     f"{fix}")
            hints = [IDENTITY_HINTS[k] for k in IDENTITY_HINTS if any(d.startswith(k + ":") for d in diffs)]
            raise ResumeMismatch(f"{what} {folder} holds a run with other settings ({'; '.join(diffs[:4])}); "
                                 f"{' '.join(hints) + ' ' if hints else ''}"
                                 f"rerun with the same options to resume, or {fix}")
        return state

    @classmethod
    def refuse_foreign(cls, folder: Path, name: str, what: str, own: tuple[str, ...] = (STATE_DIR,)) -> None:
        """Refuse a folder that is not empty (but for ``own``) and holds no run; call it before writing there,
        so a refused run leaves nothing behind (not even a lock)."""
        if not Path(folder).is_dir() or cls.load(folder, name) is not None:
            return
        leftovers = sorted(p.name for p in Path(folder).iterdir() if p.name not in own)
        if leftovers:
            raise InputError(f"{what} {folder} is not empty and holds no lowmem-gblm run "
                             f"({', '.join(leftovers[:3])}{'...' if len(leftovers) > 3 else ''}); "
                             "choose an empty folder")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, sort_keys=True, indent=1), point=self.point)

    def is_done(self, key: str) -> bool:
        """``key`` is recorded and its file is there with the recorded size."""
        entry = self.done.get(key)
        if entry is None:
            return False
        path = self.folder / entry["file"]
        return path.is_file() and path.stat().st_size == entry["size"]

    def mark_done(self, key: str, file: str, sha256: str, extra: dict | None = None) -> None:
        """Record ``file`` (already durable) as ``key``'s output."""
        size = (self.folder / file).stat().st_size
        self.done[key] = {"file": file, "sha256": sha256, "size": size, **(extra or {})}
        self.save()

    def entry(self, key: str) -> dict:
        return self.done[key]

    def finish(self) -> None:
        self.data["complete"] = True
        self.save()


def state_problem(data) -> str | None:
    """What is wrong with a state file's JSON, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
        return "no identity object"
    if not isinstance(data.get("done"), dict):
        return "'done' is not an object"
    for key, entry in data["done"].items():
        if not isinstance(entry, dict):
            return f"entry {key!r} is not an object"
        file, size, sha = entry.get("file"), entry.get("size"), entry.get("sha256")
        if not isinstance(file, str) or not file or os.path.isabs(file) or ".." in Path(file).parts:
            return f"entry {key!r} has file {file!r}"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha, str):
            return f"entry {key!r} lacks a size or sha256"
    return None


def written_bytes(folder: Path, name: str) -> int:
    """Bytes of the files a run in ``folder`` recorded as done and that are still there: space a rerun keeps
    (resumed) or frees (--overwrite), so the disk check must not count it twice."""
    state = RunState.load(folder, name) if Path(folder).is_dir() else None
    if state is None:
        return 0
    total = 0
    for entry in state.done.values():
        path = Path(folder) / entry["file"]
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Delete temporary files a killed run left in OUT_DIR and its state folder (call under the lock)."""
    removed = []
    for folder in (out_dir, out_dir / STATE_DIR):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            stale = TMP_MARK in child.name or child.name.startswith(".write-probe-")
            if child.is_file() and child.name.startswith(".") and stale:
                child.unlink()
                removed.append(child.name)
    return removed




class OutputLock:
    """An exclusive flock on OUT_DIR/.lowmem/lock: a second run refuses; a dead run leaves no stale lock."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / STATE_DIR / "lock"
        self._fd = None

    def __enter__(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _lock_error(self.path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise InputError(
                f"another lowmem-gblm run (pid {holder or '?'}) is writing {self.path.parent.parent}; "
                "wait for it or pick another OUT_DIR"
            ) from None
        try:  # the holder's pid, for the message above (the flock itself is the lock)
            crash_point("lock_write")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise _lock_error(self.path, exc) from exc
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_error(path: Path, exc: OSError) -> InputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpace(f"no space left on the device for the lock file {path} ({exc.strerror}); free space "
                          "and run the same command again")
    return InputError(f"cannot create the lock file {path} ({exc.strerror or exc}); is the folder writable?")


def check_out_dir(out_dir: Path, model_dir: Path) -> None:
    """OUT_DIR is not the model folder, not inside it, holds none of its files (where they resolve: a Hugging Face
    cache snapshot's links into a ``blobs`` folder that is OUT_DIR, or hard links) and is not a file (reads only)."""
    out_r, model_r = out_dir.resolve(), model_dir.resolve()
    if out_r == model_r or model_r in out_r.parents:
        raise InputError(f"OUT_DIR {out_dir} is MODEL_DIR or inside it; choose a folder outside {model_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"OUT_DIR {out_dir} exists and is not a folder")
    held = model_files_in(out_dir, model_dir)
    if held:
        raise InputError(f"OUT_DIR {out_dir} holds MODEL_DIR's own data ({held}); writing there would change the "
                         "input model: choose another OUT_DIR (nothing was deleted)")


def model_files_in(out_dir: Path, model_dir: Path) -> str | None:
    """The first of MODEL_DIR's entries whose data is in OUT_DIR ("NAME -> TARGET"): it resolves to OUT_DIR or into
    it, or it is the same file as one of OUT_DIR's (a hard link); None when there is none (reads only)."""
    out_r = out_dir.resolve()
    model_entries = sorted(Path(model_dir).iterdir())
    for child in model_entries:
        try:
            target = child.resolve()
        except (OSError, RuntimeError):  # a loop: the model's own checks refuse it
            continue
        if target == out_r or out_r in target.parents:
            return f"{child.name} -> {target}"
    if not out_dir.is_dir():
        return None
    ids = {}
    for child in model_entries:
        with contextlib.suppress(OSError):
            st = child.stat()
            ids[(st.st_dev, st.st_ino)] = child.name
    for entry in sorted(out_dir.iterdir()):
        with contextlib.suppress(OSError):
            st = entry.stat()
            if (st.st_dev, st.st_ino) in ids and not entry.is_dir():
                return f"{ids[(st.st_dev, st.st_ino)]} is the same file as {entry}"
    return None


def prepare_out_dir(out_dir: Path, model_dir: Path) -> None:
    """Validate OUT_DIR (``check_out_dir``), create it and check it is writable."""
    check_out_dir(out_dir, model_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"OUT_DIR {out_dir} is not writable ({exc.strerror}); choose a writable folder") from exc
