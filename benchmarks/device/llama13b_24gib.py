"""LLaMA-13B-shaped GBLM on a 24 GiB device budget: the driver behind ``llama13b_24gib.sh``.

Steps (each a subcommand, run by the shell script with its own timeout; results under --out):

    env      the machine: GPU, torch / transformers, cores, RAM, free space   -> env.json
    sparse   one 2:4-pruned 13B-shaped linear, x @ W.T dense vs semi-structured sparse -> sparse_2of4.json
    ckpt     checks free space against the checkpoint + the planner's disk peak for the run, measures the
             run folder's fsync'd write rate (1 GiB), then writes a random bf16 checkpoint of the shape, one
             block per shard, generated on the GPU, 4 shards at a time, and syncs it   -> checkpoint.json
    prune    in this process: cap the device at --cap-gib (set_per_process_memory_fraction), a short
             timing probe of block 0 to pick N, then lowmem_gblm.engine.prune(PruneConfig(gblm, l1,
             N x T, offload cpu, bf16)); per-block timings recorded as it runs  -> llama13b_24gib.json
    report   (no torch) merges the four JSON files into llama13b_24gib.json and writes llama13b_24gib.txt;
             works on a partial run (a prune killed by its timeout keeps what it recorded per block)

``--shape tiny`` is the CPU self-check: the same steps on a 4-block d=256 LLaMA, seconds long; the GPU-only
parts (memory fraction, semi-structured sparse) are skipped with a message. The shell script puts the
repository (the package is not installed on the GPU image) and benchmarks/ (scale.py) on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GIB = 2**30
RESULT, TABLE = "llama13b_24gib.json", "llama13b_24gib.txt"
ENV, SPARSE, CKPT = "env.json", "sparse_2of4.json", "checkpoint.json"
SEED = 0
CANDIDATES = (32, 16, 8, 4)  # N tried from the largest; 32 x 2048 keeps the RAM store at ~27 GB (41 boundaries)
SAFETY = 1.5  # the estimate times this must fit the time left
ENGINE_OVERHEAD_S = 30.0  # open the model, the plan check (fake-tensor probe, CUDA host-bytes subprocess), finalize
MIN_DISK_RATE = 0.4e9  # bytes/s (fsync'd): below it the ~80 GB the steps write do not fit the budget -> RAM_DIR
RAM_DIR = "/dev/shm/llama13b_24gib"  # tmpfs fallback for the checkpoint (and the run) when no disk has room


# ----------------------------------------------------------------------------------------------------- helpers
def fmt(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def secs(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts; '?' if unknown)."""
    path = path.resolve()
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            inside = (str(path) + "/").startswith(parts[1].rstrip("/") + "/") if len(parts) >= 3 else False
            if inside and len(parts[1]) >= len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def shape_config(name: str) -> dict:
    from scale import CONFIGS, SHAPES  # benchmarks/scale.py: the tiny shape and the config folder

    cfg = dict(SHAPES[name]) if name in SHAPES else json.loads((CONFIGS / f"{name}.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    return cfg


def sizes(cfg: dict) -> dict:
    """Bytes of the bf16 checkpoint, one block, its linears."""
    from scale import numel, tensor_shapes

    shapes = tensor_shapes(cfg)
    block = [s for n, s in shapes if n.startswith("model.layers.0.")]
    linear = [s for n, s in shapes if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    return {"model_bytes": 2 * sum(numel(s) for _, s in shapes), "block_bytes": 2 * sum(numel(s) for s in block),
            "block_linear_numel": sum(numel(s) for s in linear), "blocks": cfg["num_hidden_layers"]}


def run_settings(args) -> dict:
    tiny = args.shape == "tiny"
    return {"seqlen": args.seqlen or (128 if tiny else 2048), "device": "cpu" if tiny else "cuda",
            "dtype": "bfloat16", "grad_dtype": "bfloat16", "offload": "cpu", "method": "gblm", "grad_norm": "l1",
            "sparsity": 0.5, "pattern": "unstructured", "alpha": 100.0, "batch_size": args.batch_size}


def incoming_bytes(n: int, t: int, d: int) -> int:
    """The gradient sweep's persisted incoming gradient (OUT_DIR/.lowmem/gradients/.lowmem/incoming...):
    one [N, T, D] bf16 buffer, rewritten after every block; the planner does not count it."""
    return n * t * d * 2


# ----------------------------------------------------------------------------------------------------- env
def cmd_env(args) -> None:
    info: dict = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "shape": args.shape, "cpus": os.cpu_count(),
                  "python": sys.version.split()[0], "executable": sys.executable}
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        info["mem_total_bytes"] = int(meminfo["MemTotal"].split()[0]) * 1024
        info["mem_available_bytes"] = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({exc.__class__.__name__})"
    import safetensors
    import torch
    import transformers

    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                        "safetensors": safetensors.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "total_memory_bytes": p.total_memory, "sm": f"{p.major}.{p.minor}",
                       "multiprocessors": p.multi_processor_count}
        try:
            info["cusparselt"] = bool(torch.backends.cusparselt.is_available())
        except AttributeError:
            info["cusparselt"] = None
    dirs = {}
    for d in {str(args.work), "/tmp", "/dev/shm", str(ROOT)}:
        p = Path(d)
        if p.exists() or p.parent.exists():
            dirs[d] = {"free_bytes": free_bytes(p), "fs": fs_type(p if p.exists() else p.parent)}
    info["dirs"] = dirs
    write_json(args.out / ENV, info)
    log(f"env: {info.get('gpu', {}).get('name', 'no CUDA device')}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {info['cpus']} cpus; RAM {fmt(info.get('mem_total_bytes'))} "
        f"(available {fmt(info.get('mem_available_bytes'))})")
    for d, v in sorted(dirs.items()):
        log(f"env: {d}: {fmt(v['free_bytes'])} free ({v['fs']})")


# ----------------------------------------------------------------------------------------------------- sparse
def cmd_sparse(args) -> None:
    import torch
    import torch.nn.functional as F

    from lowmem_gblm.mask import Pattern, select_keep

    pattern = Pattern.parse("2:4", None)
    res: dict = {"pattern": str(pattern), "mask": "magnitude |W|, lowmem_gblm.mask.select_keep", "cases": []}
    cuda = torch.cuda.is_available() and args.shape != "tiny"
    shapes = {"tiny": [("gate_proj", 688, 256)],
              "full": [("gate/up_proj", 13824, 5120), ("down_proj", 5120, 13824), ("q/k/v/o_proj", 5120, 5120)]}
    rows = (128, 256) if not cuda else (2048, 16384)
    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator(device=device).manual_seed(SEED)
    if not cuda:
        res["semi_structured"] = ("skipped: torch.sparse.to_sparse_semi_structured needs a CUDA device "
                                  "(compute capability >= 8.0); CPU self-check runs the 2:4 masking and the dense "
                                  "matmul only")
        log(f"sparse: {res['semi_structured']}")
    else:
        try:
            res["cusparselt"] = bool(torch.backends.cusparselt.is_available())
        except AttributeError:
            res["cusparselt"] = None

    def bench(fn, iters: int = 20, warmup: int = 5) -> float:
        """ms per call (CUDA events; wall clock on the CPU)."""
        for _ in range(warmup):
            fn()
        if not cuda:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters * 1e3
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / iters

    for label, out_f, in_f in shapes["tiny" if args.shape == "tiny" else "full"]:
        w = torch.randn(out_f, in_f, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        keep = select_keep(w.float().abs(), pattern)  # [out, in] bool, 2 kept in every 4 consecutive inputs
        w = w.masked_fill(~keep, 0)
        ok = bool((keep.view(out_f, in_f // 4, 4).sum(-1) == 2).all())
        del keep
        for m in rows:
            x = torch.randn(m, in_f, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
            dense = F.linear(x, w)
            case = {"linear": label, "weight": [out_f, in_f], "x": [m, in_f], "two_of_four_ok": ok,
                    "dense_ms": round(bench(lambda x=x, w=w: F.linear(x, w)), 4)}
            flops = 2 * m * out_f * in_f
            case["dense_tflops"] = round(flops / case["dense_ms"] / 1e9, 1)
            if cuda:
                from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

                for backend in ("cusparselt", "cutlass"):
                    try:
                        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                        ws = to_sparse_semi_structured(w)
                        got = F.linear(x, ws)
                        err = float((got.float() - dense.float()).abs().max() / dense.float().abs().max())
                        ms = bench(lambda x=x, ws=ws: F.linear(x, ws))
                        case[backend] = {"ms": round(ms, 4), "speedup": round(case["dense_ms"] / ms, 3),
                                         "max_rel_err": err, "class": type(ws).__name__}
                        del ws, got
                    except Exception as exc:  # noqa: BLE001 - report whatever the backend says
                        first = (str(exc).splitlines() or [""])[0][:300]
                        case[backend] = {"error": f"{exc.__class__.__name__}: {first}"}
                SparseSemiStructuredTensor._FORCE_CUTLASS = False
            res["cases"].append(case)
            parts = [f"dense {case['dense_ms']:.3f} ms ({case['dense_tflops']} TFLOP/s)"]
            for backend in ("cusparselt", "cutlass"):
                if backend in case:
                    c = case[backend]
                    parts.append(f"{backend} " + (f"{c['ms']:.3f} ms (x{c['speedup']:.2f}, max rel err "
                                                  f"{c['max_rel_err']:.1e})" if "ms" in c else c["error"]))
            log(f"sparse: {label} W{[out_f, in_f]} x{[m, in_f]} 2:4 ok={ok}: " + "; ".join(parts))
            del x, dense
        del w
    write_json(args.out / SPARSE, res)


# ----------------------------------------------------------------------------------------------------- ckpt
def write_checkpoint(folder: Path, cfg: dict, device, workers: int) -> dict:
    """One shard per block plus one for embedding / norm / head; random N(0, 0.02) weights generated on
    ``device`` (per-shard generators), norms 1; ``workers`` shards in flight at once. Returns timings."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors.torch import save_file
    from scale import shard_groups

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    groups = shard_groups(cfg)
    keys = sorted(groups)

    def one(k: int) -> tuple[dict, int]:
        shard = f"model-{k + 1:05d}-of-{len(keys):05d}.safetensors"
        gen = torch.Generator(device=device).manual_seed(SEED * 100_003 + k)
        tensors = {}
        for name, shape in groups[keys[k]]:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
                tensors[name] = t.to(torch.bfloat16).cpu()
                del t
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return {name: shard for name in tensors}, nbytes

    t0 = time.perf_counter()
    weight_map, total = {}, 0
    with ThreadPoolExecutor(workers) as pool:
        for names, nbytes in pool.map(one, range(len(keys))):
            weight_map.update(names)
            total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    written = time.perf_counter() - t0
    os.sync()  # the disk rate includes getting the bytes onto the disk, not only into the page cache
    synced = time.perf_counter() - t0
    return {"bytes": total, "shards": len(keys), "write_s": round(written, 2), "write_and_sync_s": round(synced, 2),
            "disk_write_bytes_per_s": total / max(synced, 1e-9)}


def cmd_ckpt(args) -> None:
    import torch

    from lowmem_gblm.memory.plan import Budgets, PlanSettings, plan
    from lowmem_gblm.memory.shape import load_shape

    cfg = shape_config(args.shape)
    s = run_settings(args)
    sz = sizes(cfg)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    shape_json = work / "shape.config.json"
    shape_json.write_text(json.dumps(cfg))
    nmax = max(CANDIDATES) if args.nsamples is None else args.nsamples
    p = plan(load_shape(shape_json), PlanSettings("gblm", nmax, s["seqlen"], device=s["device"],
                                                  compute_dtype=s["dtype"], offload="cpu", grad_dtype=s["grad_dtype"],
                                                  phases=("gradient_sweep", "prune_sweep")), Budgets(), baseline=0)
    run_need = p.disk_bytes + incoming_bytes(nmax, s["seqlen"], cfg["hidden_size"])
    slack = GIB if args.shape != "tiny" else 0
    disk_free, ram = free_bytes(work), Path(RAM_DIR)
    ram_free = free_bytes(ram.parent) if ram.parent.is_dir() else 0
    info = {"shape": args.shape, "config": cfg, **sz, "run_disk_bytes_predicted": run_need, "nsamples_max": nmax,
            "work": str(work), "work_fs": fs_type(work), "work_free_bytes": disk_free, "slack_bytes": slack,
            "ram_dir": str(ram), "ram_dir_free_bytes": ram_free}
    model_bytes = sz["model_bytes"]
    info["work_write"] = rate = disk_rate(work, (16 if args.shape == "tiny" else 1024) << 20)
    log(f"ckpt: {work}: " + (f"{fmt(rate['bytes'])} written + fsync in {rate['seconds']:.2f} s "
                             f"({rate['bytes_per_s'] / 1e9:.2f} GB/s)" if rate["bytes_per_s"] else
                             f"write rate not measured ({rate.get('error')})"))
    slow = (rate["bytes_per_s"] or 1e12) < MIN_DISK_RATE and args.shape != "tiny"
    if slow and ram_free >= model_bytes + run_need + slack:  # the run's ~80 GB of fsync'd writes would not fit
        model_dir, run_dir = ram / "model", ram / "run"
        info["model_on"] = (f"{ram.parent} ({fs_type(ram.parent)}, RAM), with the run: {work} writes at "
                            f"{rate['bytes_per_s'] / 1e9:.2f} GB/s, under {MIN_DISK_RATE / 1e9:.1f} GB/s, too slow "
                            "for the checkpoint and the run's files in the time budget")
    elif args.model_in_ram and disk_free >= run_need + slack and ram_free >= model_bytes + slack:
        model_dir, run_dir = ram / "model", work
        info["model_on"] = f"{ram.parent} ({fs_type(ram.parent)}, RAM; --model-in-ram), the run on {work}"
    elif disk_free >= model_bytes + run_need + slack:  # the plan: everything on the disk
        model_dir, run_dir = work / "model", work
        info["model_on"] = f"{work} ({fs_type(work)}), with the run"
    elif disk_free >= run_need + slack and ram_free >= model_bytes + slack:
        model_dir, run_dir = ram / "model", work
        info["model_on"] = (f"{ram.parent} ({fs_type(ram.parent)}, RAM): {work} holds the run's output and gradient "
                            "files but not the checkpoint too")
    elif ram_free >= model_bytes + run_need + slack:
        model_dir, run_dir = ram / "model", ram / "run"
        info["model_on"] = f"{ram.parent} ({fs_type(ram.parent)}, RAM), with the run: no disk had room"
    else:
        info["error"] = (f"not enough space: {work} ({fs_type(work)}) has {fmt(disk_free)} free, {ram.parent} "
                         f"{fmt(ram_free)}; the checkpoint needs {fmt(model_bytes)} and the run {fmt(run_need)} "
                         f"(output + bf16 gradient files as the planner predicts them, + the incoming-gradient file), "
                         f"plus {fmt(slack)} slack. Set LLAMA13B_WORK to a larger folder.")
        write_json(args.out / CKPT, info)
        log("ckpt: " + info["error"])
        sys.exit(3)
    run_dir.mkdir(parents=True, exist_ok=True)
    info.update(model_dir=str(model_dir), run_dir=str(run_dir), run_fs=fs_type(run_dir))
    log(f"ckpt: {work} ({info['work_fs']}) has {fmt(disk_free)} free, {ram.parent} {fmt(ram_free)}; checkpoint "
        f"{fmt(model_bytes)} on {info['model_on']}; the run needs {fmt(run_need)} in {run_dir} (planner, N={nmax})")
    if run_dir != work:  # the run's files go elsewhere: their rate is the one that counts
        rate = disk_rate(run_dir, (16 if args.shape == "tiny" else 1024) << 20)
        if rate["bytes_per_s"]:
            log(f"ckpt: {run_dir}: {fmt(rate['bytes'])} written + fsync in {rate['seconds']:.2f} s "
                f"({rate['bytes_per_s'] / 1e9:.2f} GB/s)")
    info["run_dir_write"] = rate
    cuda = torch.cuda.is_available() and s["device"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    shutil.rmtree(model_dir, ignore_errors=True)
    write_json(args.out / CKPT, info)  # the folders are known before the long write (the prune step needs them)
    timing = write_checkpoint(model_dir, cfg, device, workers=args.workers)
    info.update(timing, generated_on=str(device), model_fs=fs_type(model_dir))
    write_json(args.out / CKPT, info)
    log(f"ckpt: {fmt(timing['bytes'])} in {timing['shards']} shards, generated on {device}: written in "
        f"{timing['write_s']} s, synced at {timing['write_and_sync_s']} s "
        f"({timing['disk_write_bytes_per_s'] / 1e9:.2f} GB/s to {fs_type(model_dir)})")


def disk_rate(folder: Path, nbytes: int) -> dict:
    """Write ``nbytes`` (incompressible) to a file in ``folder`` with one fsync, as the run's atomic writes do."""
    blob = os.urandom(1 << 24)
    path = folder / ".disk_rate.tmp"
    n = max(1, nbytes // len(blob)) * len(blob)
    t0 = time.perf_counter()
    try:
        if free_bytes(folder) < n + GIB:
            raise OSError(f"{fmt(free_bytes(folder))} free")
        with open(path, "wb") as f:
            for _ in range(n // len(blob)):
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # no room to measure: the estimate assumes 1 GB/s
        return {"bytes": 0, "seconds": 0.0, "bytes_per_s": None, "error": str(exc)}
    finally:
        path.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    return {"bytes": n, "seconds": dt, "bytes_per_s": n / max(dt, 1e-9)}


# ----------------------------------------------------------------------------------------------------- prune
class DevicePoller:
    """Peak of the device memory this process holds as the driver sees it (total - free: the CUDA
    context and the caching allocator's reserve included), sampled every 50 ms."""

    def __init__(self, torch):
        self.torch, self.peak, self._stop = torch, 0, threading.Event()
        total, free = torch.cuda.mem_get_info()[1], torch.cuda.mem_get_info()[0]
        self.base = total - free  # before this process allocated anything but its context
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak


class Recorder:
    """Per-block timings of every sweep, from the engine's own progress calls (PhaseProgress.windows after
    each window, .block after each block), with a CUDA sync before each timestamp so a window's time is its
    compute. Also times a few engine steps by wrapping them. Saves the partial result after every block."""

    def __init__(self, save, cuda: bool):
        self.save, self.cuda = save, cuda
        self.blocks: list[dict] = []
        self.steps: dict[str, dict] = {}
        self.phases: list[dict] = []  # each engine phase's measured stats as it ends (a stopped one too)
        self.plan: dict = {}  # the engine's plan (its summary), as soon as the run has one

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def install(self) -> None:
        import importlib

        # modules by path: the package re-exports a function named prune over its submodule's name
        G = importlib.import_module("lowmem_gblm.engine.gradients")
        P = importlib.import_module("lowmem_gblm.engine.progress")
        PR = importlib.import_module("lowmem_gblm.engine.prune")

        rec = self
        orig_windows, orig_block = P.PhaseProgress.windows, P.PhaseProgress.block

        def windows(self, done):
            now = rec.now()
            last = self.__dict__.get("_rec_last", self.__dict__.get("_rec_start", self.t0))
            prev = self.__dict__.get("_rec_done", 0)
            first = done <= prev  # a new pass over the windows (the prune sweep makes two per block)
            # [windows done, seconds since the last call, windows in this call, first call of a pass]
            self.__dict__.setdefault("_rec_win", []).append([done, now - last, done if first else done - prev,
                                                             first or prev == 0])
            self._rec_last, self._rec_done = now, done
            return orig_windows(self, done)

        def block(self, label, replayed=False):
            now = rec.now()
            start = self.__dict__.get("_rec_start", self.t0)
            rec.blocks.append({"sweep": self.what, "k": self.done + 1, "of": self.total, "label": label,
                               "seconds": now - start, "windows": self.__dict__.pop("_rec_win", [])})
            self._rec_start = self._rec_last = now
            self._rec_done = 0
            rec.save()
            return orig_block(self, label, replayed)

        P.PhaseProgress.windows, P.PhaseProgress.block = windows, block
        tracker = importlib.import_module("lowmem_gblm.memory.tracker").PhaseTracker
        orig_exit = tracker.__exit__

        def phase_exit(self, *exc):
            out = orig_exit(self, *exc)
            rec.phases.append({**self.stats.to_dict(), "completed": exc[0] is None})
            rec.save()
            return out

        tracker.__exit__ = phase_exit
        R = importlib.import_module("lowmem_gblm.engine.run")
        orig_plan = getattr(R, "plan_run", None)
        if orig_plan is not None:
            def plan_run(*a, **kw):
                plan = orig_plan(*a, **kw)
                rec.plan.update(plan.summary())
                rec.save()
                return plan

            R.plan_run = plan_run
        self.wrap(G, "save_windows", "incoming gradient persisted (per block)")
        self.wrap(G, "embed", "embed (gradient sweep)")
        self.wrap(PR, "embed", "embed (prune sweep)")
        self.wrap(G._Sweep, "head", "head: loss + dL/dh for every window")
        self.wrap(G._Sweep, "write_block", "gradient file + incoming gradient written (per block)")
        self.wrap(PR._PruneSweep, "prune_block", "statistics pass + scores + masks (per block)")
        self.wrap(PR, "save_tensors_atomic", "output shard serialized + sha256 + fsync (per shard)")

    def wrap(self, owner, name: str, label: str) -> None:
        orig = getattr(owner, name, None)
        if orig is None:  # the engine changed: time what is still there
            self.steps[label] = {"calls": 0, "seconds": 0.0, "note": f"{getattr(owner, '__name__', owner)}.{name} "
                                 "not found; not timed"}
            return
        entry = self.steps.setdefault(label, {"calls": 0, "seconds": 0.0})
        rec = self

        def timed(*a, **kw):
            t0 = rec.now()
            try:
                return orig(*a, **kw)
            finally:
                entry["calls"] += 1
                entry["seconds"] += rec.now() - t0

        setattr(owner, name, timed)


def sweep_summary(blocks: list[dict], nsamples: int) -> dict:
    """Per sweep: blocks done, s/block (mean, median, max), one window's compute (the mean interval between
    window callbacks per window, the first call of each pass left out: it carries the block's other work),
    windows per block, and the rest of a block's time (read, write, scoring)."""
    out: dict[str, dict] = {}
    for sweep in dict.fromkeys(b["sweep"] for b in blocks):
        bs = [b for b in blocks if b["sweep"] == sweep]
        sec = [b["seconds"] for b in bs]
        # seconds per window of each call after the first of its pass (that one carries the block's other work)
        clean = ([w[1] / w[2] for b in bs for w in b["windows"] if not w[3]]
                 or [w[1] / w[2] for b in bs for w in b["windows"]])
        per_block_windows = statistics.mean(sum(w[2] for w in b["windows"]) for b in bs)
        win = statistics.mean(clean) if clean else None
        out[sweep] = {"blocks": len(bs), "seconds": sum(sec), "s_per_block_mean": statistics.mean(sec),
                      "s_per_block_median": statistics.median(sec), "s_per_block_max": max(sec),
                      "s_per_block_first": sec[0], "window_s": win,
                      "window_s_median": statistics.median(clean) if clean else None,
                      "windows_per_block": per_block_windows,
                      "other_s_per_block": None if win is None else statistics.mean(sec) - per_block_windows * win}
    return out


def probe_timing(model_dir: Path, cfg: dict, s: dict, cuda: bool, ckpt: dict) -> dict:
    """Time block 0 through the engine's own steps (forward; recomputed forward + one-window backward into
    fp32 accumulators; a select_keep of one gate_proj-sized score) and sha256, to pick N before the run."""
    import torch

    from lowmem_gblm.engine.run import open_model
    from lowmem_gblm.io.model import linear_names
    from lowmem_gblm.mask import Pattern, select_keep
    from lowmem_gblm.stream.backward import grad_accumulators
    try:  # B windows per call (newer engine) or one (older); same arguments
        from lowmem_gblm.stream.backward import block_windows as block_step
    except ImportError:
        from lowmem_gblm.stream.backward import block_sample as block_step
    from lowmem_gblm.stream.context import BlockContext, run_block

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t, d = s["seqlen"], cfg["hidden_size"]
    model = open_model(model_dir)
    loads = []
    for _ in range(2):  # the faster of two reads: the first pays one-time costs (module classes, pinned pool)
        block = None
        t0 = time.perf_counter()
        block = model.load_block(0, device, dtype)
        sync()
        loads.append(time.perf_counter() - t0)
    load_s = min(loads)
    ctx = BlockContext.build(model, t, device, dtype)
    gen = torch.Generator(device=device).manual_seed(SEED)
    x = torch.randn(1, t, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    g = torch.randn(1, t, d, generator=gen, device=device, dtype=torch.float32).mul_(1e-4).to(dtype)

    def timed(fn, reps: int) -> float:
        fn()  # two warm-up calls (kernel selection, allocator)
        fn()
        sync()
        t1 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t1) / reps

    with torch.no_grad():
        fwd = timed(lambda b=block, x=x: run_block(b, ctx, x), 3)
    names = linear_names(block)
    weights, accs = grad_accumulators(block, names, device)
    bwd = timed(lambda b=block, w=weights, a=accs, x=x, g=g: block_step(b, ctx, w, a, x, g, "l1", device, dtype), 2)
    del weights, accs, block, x, g
    ref_shape = (cfg["intermediate_size"], d)  # one gate_proj's score, fp32
    ref = torch.rand(ref_shape, generator=gen, device=device)
    pattern = Pattern.parse("unstructured", 0.5)
    sort = timed(lambda r=ref: select_keep(r, pattern), 1)
    del ref
    blob = os.urandom(1 << 26)
    t1 = time.perf_counter()
    for _ in range(4):
        hashlib.sha256(blob).digest()
    sha_rate = 4 * len(blob) / (time.perf_counter() - t1)
    peak = 0
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
    return {"device_max_allocated_bytes": peak, "block_load_s": load_s, "window_forward_s": fwd,
            "window_backward_s": bwd, "select_keep_ref_s": sort, "select_keep_ref_numel": ref_shape[0] * ref_shape[1],
            "sha256_bytes_per_s": sha_rate,
            "disk_write_bytes_per_s": (ckpt.get("run_dir_write") or {}).get("bytes_per_s")}


def estimate(t: dict, sz: dict, n: int, seqlen: int, d: int) -> dict:
    """Predicted seconds per block of each sweep and in total for N windows, from the timing probe: window
    compute at the probe's rates, a block read where it is not hidden behind compute, each block's files
    (gradient file, output shard, the incoming-gradient buffer) at the run folder's measured fsync'd write
    rate, their sha256 at the measured hash rate, the selection scaled from one gate_proj to the block."""
    w = t["disk_write_bytes_per_s"] or 1e9
    h = t["sha256_bytes_per_s"]
    bb = sz["block_bytes"]
    sort_block = t["select_keep_ref_s"] * sz["block_linear_numel"] / t["select_keep_ref_numel"]
    fwd = max(n * t["window_forward_s"], t["block_load_s"])  # the next block is read while this one computes
    # reverse: N backward windows; gradient file (serialized, file + per-tensor sha256, fsync); incoming gradient
    rev = max(n * t["window_backward_s"], t["block_load_s"]) + bb / w + 2 * bb / h + incoming_bytes(n, seqlen, d) / w
    # prune: statistics pass + pruned forward, scores and sorts, gradient read (sha256, widen), shard written
    prune = (max(2 * n * t["window_forward_s"], t["block_load_s"]) + sort_block + 2 * bb / h + bb / w
             + 2 * t["block_load_s"])
    per_block = {"gradient forward": fwd, "gradients": rev, "prune": prune}
    total = ENGINE_OVERHEAD_S + sz["blocks"] * sum(per_block.values())
    return {"nsamples": n, "s_per_block": per_block, "total_s": total}


def choose_n(t: dict, sz: dict, seqlen: int, d: int, left_s: float) -> tuple[int, list[dict], bool]:
    """(N, the estimates, whether N's estimate x SAFETY fits): the largest candidate that fits, else the smallest."""
    tried = [estimate(t, sz, n, seqlen, d) for n in CANDIDATES]
    for e in tried:
        if e["total_s"] * SAFETY <= left_s:
            return e["nsamples"], tried, True
    return min(CANDIDATES), tried, False


def cmd_prune(args) -> None:
    import torch

    from lowmem_gblm.calib.data import save_ids
    from lowmem_gblm.config import CalibConfig, PruneConfig
    from lowmem_gblm.engine import prune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)

    def on_term(signum, frame):  # the shell's `timeout`: record what was done, then stop
        raise SystemExit(f"stopped by signal {signum} (the step's timeout)")

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.perf_counter()
    ckpt = read_json(args.out / CKPT) or {}
    if "model_dir" not in ckpt or not (Path(ckpt["model_dir"]) / "model.safetensors.index.json").is_file():
        raise SystemExit(f"prune: no finished checkpoint recorded in {args.out / CKPT}; run the ckpt step first")
    cfg, s = ckpt["config"], run_settings(args)
    sz = sizes(cfg)
    model_dir, run_dir = Path(ckpt["model_dir"]), Path(ckpt["run_dir"])
    out_dir, ids_path = run_dir / "pruned", run_dir / "calib_ids.safetensors"
    cuda = s["device"] == "cuda"
    res: dict = {"status": "running", "shape": args.shape, "settings": s, "cap_gib": args.cap_gib,
                 "model_dir": str(model_dir), "out_dir": str(out_dir)}
    save = lambda: write_json(args.out / RESULT, res)  # noqa: E731
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("prune: no CUDA device here (use --shape tiny for the CPU self-check)")
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, args.cap_gib * GIB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        res["memory_fraction"] = {"fraction": fraction, "device_total_bytes": total, "cap_bytes": int(fraction * total)}
        log(f"prune: device capped at {fmt(fraction * total)} of {fmt(total)} "
            f"(torch.cuda.set_per_process_memory_fraction({fraction:.5f}))")
        poller = DevicePoller(torch)
    else:
        res["memory_fraction"] = "skipped: no CUDA device (CPU self-check); the cap applies on the GPU only"
        log(f"prune: {res['memory_fraction']}")
        poller = None
    save()

    t0 = time.perf_counter()
    timing = probe_timing(model_dir, cfg, s, cuda, ckpt)
    timing["seconds"] = time.perf_counter() - t0
    left = args.deadline - time.time() if args.deadline else float("inf")
    if args.nsamples or args.shape == "tiny":
        n = args.nsamples or 4
        tried = [estimate(timing, sz, n, s["seqlen"], cfg["hidden_size"])]
        how = f"--nsamples {n} (given)" if args.nsamples else f"{n}: the tiny self-check's fixed size"
    else:
        n, tried, fits = choose_n(timing, sz, s["seqlen"], cfg["hidden_size"], left)
        if left == float("inf"):
            how = f"no deadline: the largest of {list(CANDIDATES)}"
        elif fits:
            how = (f"the largest of {list(CANDIDATES)} whose estimate x{SAFETY} fits the {left:.0f} s left before "
                   "the deadline")
        else:
            how = (f"none of {list(CANDIDATES)} has an estimate x{SAFETY} within the {left:.0f} s left: the smallest "
                   "(the run may be stopped by its timeout; the blocks done are reported)")
    res["timing_probe"] = timing
    res["n_choice"] = {"nsamples": n, "how": how, "seconds_left": None if left == float("inf") else left,
                       "estimates": tried}
    log(f"prune: probe of block 0: load {timing['block_load_s']:.2f} s, forward {timing['window_forward_s'] * 1e3:.1f} "
        f"ms/window, recompute+backward {timing['window_backward_s'] * 1e3:.1f} ms/window, select_keep "
        f"of {timing['select_keep_ref_numel'] / 1e6:.1f}M scores {timing['select_keep_ref_s'] * 1e3:.0f} ms, sha256 "
        f"{timing['sha256_bytes_per_s'] / 1e9:.2f} GB/s, disk {(timing['disk_write_bytes_per_s'] or 0) / 1e9:.2f} GB/s")
    for e in tried:
        log(f"prune: estimate N={e['nsamples']}: {e['total_s']:.0f} s (" + ", ".join(
            f"{k} {v:.2f} s/block" for k, v in e["s_per_block"].items()) + ")")
    log(f"prune: N = {n} windows x {s['seqlen']} tokens: {how}")
    ids = torch.randint(cfg["vocab_size"], (n, s["seqlen"]), generator=torch.Generator().manual_seed(SEED))
    save_ids(ids_path, ids)  # [N, T] int64, random: no tokenizer needed
    save()

    rec = Recorder(save, cuda)
    res["blocks"] = rec.blocks
    res["steps"] = rec.steps
    res["phases_live"] = rec.phases
    res["predicted_live"] = rec.plan
    try:
        rec.install()
    except (AttributeError, ImportError) as exc:  # the engine's internals moved: run it untimed rather than not
        res["instrumentation"] = f"incomplete: {exc.__class__.__name__}: {exc}"
        log(f"prune: per-block timing {res['instrumentation']}")
    shutil.rmtree(out_dir, ignore_errors=True)
    config = PruneConfig(model_dir=str(model_dir), out_dir=str(out_dir),
                         calib=CalibConfig(ids_file=str(ids_path), nsamples=n, seqlen=s["seqlen"]),
                         method=s["method"], sparsity=s["sparsity"], pattern=s["pattern"], alpha=s["alpha"],
                         grad_norm=s["grad_norm"], device=s["device"], dtype=s["dtype"], offload=s["offload"],
                         grad_dtype=s["grad_dtype"], gpu_memory=f"{args.cap_gib}GiB" if cuda else None,
                         cpu_memory=args.cpu_memory, batch_size=s["batch_size"], progress=True)
    res["prune_config"] = config.to_dict()
    t0 = time.perf_counter()
    try:
        report = prune(config)
    except BaseException as exc:
        res["status"] = f"failed: {exc.__class__.__name__}: {str(exc)[:500]}"
        res["prune_wall_s"] = time.perf_counter() - t0
        if poller:
            res["device_used_peak_bytes"] = poller.stop()
        save()
        raise
    res["prune_wall_s"] = time.perf_counter() - t0
    res["report"] = {k: report[k] for k in ("phases", "predicted", "seconds_total", "offload", "compute_dtype",
                                            "device", "calibration", "versions")}
    res["report"]["sparsity"] = {k: report["sparsity"][k] for k in ("overall", "zeros", "numel")}
    shutil.copy(out_dir / "prune_report.json", args.out / "prune_report.json")
    if poller:
        res["device_used_peak_bytes"] = poller.stop()
        res["device_used_before_bytes"] = poller.base
        res["probe_max_allocated_bytes"] = timing.get("device_max_allocated_bytes")
    res["host_ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["sweeps"] = sweep_summary(rec.blocks, n)
    res["extrapolation"] = extrapolate(res, n)
    res["status"] = "complete"
    res["driver_wall_s"] = time.perf_counter() - t_start
    save()
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    finish(args.out, show=False)  # the report step prints it (and rewrites it if anything changed)


def extrapolate(res: dict, n: int, to: int = 128) -> dict:
    """Wall time for ``to`` windows from this run: seconds = fixed + per_window * N, per_window = each sweep's
    mean window time x its windows per block per window x blocks, plus the N-proportional steps (embeds,
    head, incoming gradient); fixed = the run's seconds minus per_window * N."""
    sw = res["sweeps"]
    per_window = 0.0
    parts = {}
    for sweep, v in sw.items():
        if v["window_s"] is None:
            continue
        passes = v["windows_per_block"] / n  # 2 for the prune sweep (statistics pass + pruned forward)
        parts[sweep] = v["window_s"] * passes * v["blocks"]
        per_window += parts[sweep]
    for label, st in res["steps"].items():
        if label.startswith(("embed", "head", "incoming")):
            parts[label] = st["seconds"] / n
            per_window += parts[label]
    total = res["report"]["seconds_total"]
    fixed = total - per_window * n
    return {"windows": to, "measured_windows": n, "measured_s": total, "per_window_s": per_window,
            "per_window_parts_s": parts, "fixed_s": fixed, "predicted_s": fixed + per_window * to}


# ----------------------------------------------------------------------------------------------------- report
def finish(out: Path, show: bool = True) -> None:
    """Merge env / sparse / checkpoint / prune JSON into RESULT and write TABLE (no torch needed)."""
    res = read_json(out / RESULT) or {"status": "not started (the prune step wrote nothing)"}
    env, sparse, ckpt = read_json(out / ENV), read_json(out / SPARSE), read_json(out / CKPT)
    res.update({"env": env, "sparse_2of4": sparse, "checkpoint": ckpt})
    if res.get("blocks") and "sweeps" not in res:
        n = (res.get("n_choice") or {}).get("nsamples") or 1
        res["sweeps"] = sweep_summary(res["blocks"], n)
    write_json(out / RESULT, res)
    text = table(res)
    (out / TABLE).write_text(text + "\n")
    if show:
        print(text, flush=True)


def table(res: dict) -> str:
    L: list[str] = []
    env, ck, sp = res.get("env") or {}, res.get("checkpoint") or {}, res.get("sparse_2of4") or {}
    cfg = ck.get("config") or {}
    s = res.get("settings") or {}
    n = (res.get("n_choice") or {}).get("nsamples")
    gpu = (env.get("gpu") or {}).get("name", "no CUDA device")
    L.append(f"== {res.get('shape', '?')}-shaped random bf16 checkpoint, GBLM l1 50% unstructured on {gpu} "
             f"(status: {res.get('status')}) ==")
    v = env.get("versions") or {}
    L.append(f"machine: {env.get('cpus')} cpus, RAM {fmt(env.get('mem_total_bytes'))}; torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, safetensors {v.get('safetensors')}")
    if cfg:
        L.append(f"shape: {cfg.get('num_hidden_layers')} blocks, d={cfg.get('hidden_size')}, "
                 f"ffn={cfg.get('intermediate_size')}, heads {cfg.get('num_attention_heads')}, "
                 f"vocab {cfg.get('vocab_size')}; checkpoint {fmt(ck.get('bytes'))} in {ck.get('shards')} shards on "
                 f"{ck.get('model_on')}")
    if "write_and_sync_s" in ck:
        rw = ck.get("run_dir_write") or {}
        L.append(f"checkpoint written in {ck['write_s']} s, synced at {ck['write_and_sync_s']} s "
                 f"({ck['disk_write_bytes_per_s'] / 1e9:.2f} GB/s to {ck.get('model_fs')}), generated on "
                 f"{ck.get('generated_on')}; the run's folder took {(rw.get('bytes_per_s') or 0) / 1e9:.2f} "
                 f"GB/s ({fmt(rw.get('bytes'))} + fsync, {ck.get('run_fs')})")
    if ck.get("error"):
        L.append(f"checkpoint: {ck['error']}")
    mf = res.get("memory_fraction")
    if isinstance(mf, dict):
        L.append(f"device cap: {fmt(mf['cap_bytes'])} of {fmt(mf['device_total_bytes'])} "
                 f"(set_per_process_memory_fraction {mf['fraction']:.5f}) in the pruning process")
    elif mf:
        L.append(f"device cap: {mf}")
    if n:
        L.append(f"calibration: N={n} windows x T={s.get('seqlen')} tokens (random ids); {res['n_choice']['how']}")
        L.append(f"run: --method gblm --grad-norm l1 --sparsity 0.5 --dtype {s.get('dtype')} --offload "
                 f"{s.get('offload')} --grad-dtype {s.get('grad_dtype')} --batch-size {s.get('batch_size')} "
                 "(RAM store, bf16 compute, bf16 gradient files)")
    rep = res.get("report") or {}
    plan = rep.get("predicted") or res.get("predicted_live") or {}
    pred = {p["phase"]: p for p in plan.get("phases", [])}
    phases = rep.get("phases") or res.get("phases_live") or []
    if plan.get("settings"):
        ps = plan["settings"]
        L.append("plan settings: " + ", ".join(f"{k}={ps[k]}" for k in sorted(ps)))
    if rep.get("sparsity"):
        L.append(f"sparsity of the decoder linears: {rep['sparsity']['overall']:.4f}")
    if phases:
        L.append("")
        L.append(f"{'phase':<26}{'seconds':>9}{'device peak':>14}{'predicted':>12}{'reserved':>12}"
                 f"{'host peak':>12}{'predicted':>12}{'disk pred.':>12}")
        for p in phases:
            q = pred.get(p["phase"], {})
            name = p["phase"] + ("" if p.get("completed", True) else " (stopped)")
            L.append(f"{name:<26}{p['seconds']:>9.1f}{fmt(p['device_peak_allocated_bytes']):>14}"
                     f"{fmt(q.get('device_peak_bytes')):>12}{fmt(p['device_peak_reserved_bytes']):>12}"
                     f"{fmt(p['peak_rss_bytes']):>12}{fmt(q.get('host_peak_bytes')):>12}{fmt(q.get('disk_bytes')):>12}")
        L.append("(device peak: torch.cuda.max_memory_allocated per phase; reserved: the caching allocator's; host: "
                 "sampled RSS; predicted: the engine's plan, prune_report.json 'predicted')")
    if res.get("device_used_peak_bytes"):
        L.append(f"process device memory as the driver sees it (CUDA context + reserve), peak over the run: "
                 f"{fmt(res['device_used_peak_bytes'])} (before the run: {fmt(res.get('device_used_before_bytes'))}); "
                 f"the timing probe before the run allocated at most {fmt(res.get('probe_max_allocated_bytes'))}")
    if res.get("host_ru_maxrss_bytes"):
        L.append(f"host: pruning process ru_maxrss {fmt(res['host_ru_maxrss_bytes'])}")
    sw = res.get("sweeps") or {}
    est = {}
    for e in (res.get("n_choice") or {}).get("estimates", []):
        if e["nsamples"] == n:
            est = e["s_per_block"]
    if sw:
        L.append("")
        L.append(f"{'sweep':<18}{'blocks':>7}{'s/block':>9}{'median':>8}{'max':>8}{'first':>8}{'estimate':>9}"
                 f"{'window s':>10}{'win/blk':>8}{'other s/blk':>12}")
        for name, v in sw.items():
            L.append(f"{name:<18}{v['blocks']:>7}{v['s_per_block_mean']:>9.2f}{v['s_per_block_median']:>8.2f}"
                     f"{v['s_per_block_max']:>8.2f}{v['s_per_block_first']:>8.2f}{secs(est.get(name)):>9}"
                     f"{secs(v['window_s'], 3):>10}{v['windows_per_block']:>8.0f}"
                     f"{secs(v['other_s_per_block']):>12}")
        L.append("(sweeps: 'gradient forward' and 'gradients' (reverse) make the gradient sweep, 'prune' the prune "
                 "sweep; window s: mean time of one window's compute; other: the block's read / write / scoring)")
    steps = res.get("steps") or {}
    if steps:
        L.append("steps: " + "; ".join(f"{k}: {v['seconds']:.1f} s / {v['calls']} calls" for k, v in steps.items()))
    ex = res.get("extrapolation")
    if ex and est:
        chosen = next(e for e in res["n_choice"]["estimates"] if e["nsamples"] == n)
        L.append(f"estimate before the run (timing probe of block 0): {chosen['total_s']:.0f} s; measured "
                 f"{ex['measured_s']:.0f} s (engine) / {res.get('prune_wall_s', 0):.0f} s (prune call)")
    if ex:
        L.append("")
        L.append(f"measured: {ex['measured_s']:.1f} s for {ex['measured_windows']} windows = {ex['fixed_s']:.1f} s "
                 f"fixed + {ex['per_window_s']:.3f} s per window")
        layers, hidden = cfg.get("num_hidden_layers", 0), cfg.get("hidden_size", 0)
        bounds = (layers + 1) * ex["windows"] * (s.get("seqlen") or 0) * hidden * 2
        L.append(f"extrapolated to {ex['windows']} windows x {s.get('seqlen')} tokens: {ex['predicted_s']:.0f} s "
                 f"({ex['predicted_s'] / 60:.1f} min) at this run's rates (per-window parts: " + ", ".join(
                     f"{k} {v:.3f} s" for k, v in ex["per_window_parts_s"].items()) + ")")
        ram = env.get("mem_total_bytes") or 0
        if bounds > 0.6 * ram:
            L.append(f"  caveat: {ex['windows']} windows' boundaries are {fmt(bounds)} (bf16, {layers + 1} of them), "
                     f"more than a RAM store can take on this machine ({fmt(ram)} RAM): such a run needs --offload "
                     "disk, whose reads and writes are not in this figure")
        else:
            L.append(f"  {ex['windows']} windows' boundaries: {fmt(bounds)} (bf16), a RAM store as here")
    if res.get("status", "").startswith("failed"):
        L.append(f"prune: {res['status']}")
    L.append("")
    if sp.get("semi_structured"):
        L.append(f"2:4 semi-structured: {sp['semi_structured']}")
    for c in sp.get("cases", []):
        row = (f"2:4 {c['linear']:<13} W{c['weight']} x{c['x']}: dense {c['dense_ms']:.3f} ms "
               f"({c['dense_tflops']} TFLOP/s)")
        for backend in ("cusparselt", "cutlass"):
            b = c.get(backend)
            if b:
                row += (f"; {backend} {b['ms']:.3f} ms x{b['speedup']:.2f} (err {b['max_rel_err']:.1e})" if "ms" in b
                        else f"; {backend} unsupported: {b['error'][:120]}")
        L.append(row)
    if not sp:
        L.append("2:4 semi-structured: no result (step failed or did not run)")
    return "\n".join(L)


def cmd_report(args) -> None:
    finish(args.out)


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["env", "sparse", "ckpt", "prune", "report"])
    ap.add_argument("--shape", default="llama-13b", help="llama-13b (default) | tiny (CPU self-check) | a config name")
    ap.add_argument("--out", type=Path, required=True, help="results folder ($OUT on the device machine)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama13b_24gib"),
                    help="scratch folder for the checkpoint, calibration ids and the pruned output")
    ap.add_argument("--seqlen", type=int, help="tokens per window (default 2048; tiny: 128)")
    ap.add_argument("--nsamples", type=int, help="windows (default: chosen from the timing probe and the deadline)")
    ap.add_argument("--deadline", type=float, help="unix time by which the prune must be done (picks N)")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="device memory cap of the pruning process")
    ap.add_argument("--cpu-memory", default="120GiB", help="host budget of the plan check (the machine has 128 GiB; "
                    "its MemAvailable starts low and grows)")
    ap.add_argument("--batch-size", type=int, default=1, help="windows per block call (PruneConfig.batch_size)")
    ap.add_argument("--workers", type=int, default=4, help="shards written at once")
    ap.add_argument("--keep", action="store_true", help="keep the pruned output")
    ap.add_argument("--model-in-ram", action="store_true",
                    help=f"ckpt: write the checkpoint under {RAM_DIR} (tmpfs) even when the disk has room")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"env": cmd_env, "sparse": cmd_sparse, "ckpt": cmd_ckpt, "prune": cmd_prune, "report": cmd_report}[args.step](args)


if __name__ == "__main__":
    main()
