"""Scale check: a random-weight checkpoint with a real model's exact shapes, pruned in a subprocess,
measured (peak RSS, bytes read, wall time) next to the planner's prediction.

    python benchmarks/scale.py --shape llama-13b --out /big/disk/scale
    python benchmarks/scale.py --shape tiny --out /tmp/scale            # a seconds-long self-check

The checkpoint is bf16, one block per safetensors shard, written tensor by tensor (RAM stays at
about one block). No tokenizer: calibration is a small file of random ids (--calib-ids). Prints a
table and ends with one JSON line. ``bytes_read`` is the tracker's rchar: safetensors reads shards
through mmap, which rchar does not count, so it understates what the run read from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowmem_gblm.calib.data import save_ids
from lowmem_gblm.memory.plan import Budgets, PlanSettings, plan
from lowmem_gblm.memory.probe import baseline_rss
from lowmem_gblm.memory.shape import load_shape
from lowmem_gblm.units import fmt_size

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "benchmarks" / "configs"
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "bos_token_id": 0, "eos_token_id": 1, "rope_theta": 10000.0, "tie_word_embeddings": False}
SHAPES = {
    # SmolLM2-135M's layout (30 blocks, GQA 3:1, tied 49152 vocabulary) at 4x its width
    "smollm2-4x": _LLAMA | {"num_hidden_layers": 30, "hidden_size": 2304, "intermediate_size": 6144,
                            "num_attention_heads": 36, "num_key_value_heads": 12, "vocab_size": 49152,
                            "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "tiny": _LLAMA | {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8,
                      "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 1024},
}


def shape_config(args) -> dict:
    known = SHAPES.get(args.shape)
    cfg = dict(known) if known else json.loads((CONFIGS / f"{args.shape}.json").read_text())
    for key, flag in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                      ("intermediate_size", args.inter), ("num_attention_heads", args.heads),
                      ("num_key_value_heads", args.kv_heads), ("vocab_size", args.vocab)):
        if flag is not None:
            cfg[key] = flag
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    return cfg


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM in checkpoint order."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    out.append(("model.norm.weight", (d,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, d)))
    return out


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_groups(cfg: dict) -> dict[str, list]:
    """Tensor (name, shape) lists, one per shard: "blockNNNNN" per decoder block, "rest" for the others."""
    groups: dict[str, list] = {}
    for name, shape in tensor_shapes(cfg):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"block{int(m.group(1)):05d}" if m else "rest", []).append((name, shape))
    return groups


def write_checkpoint(folder: Path, cfg: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> int:
    """One shard per block (plus one for embedding / head); tensors made one at a time. Returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    groups = shard_groups(cfg)
    keys = sorted(groups)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, key in enumerate(keys):
        shard = f"model-{k + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = {}
        for name, shape in groups[key]:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = torch.empty(shape, dtype=dtype)
                for row in range(0, shape[0], 4096):  # fp32 scratch stays small
                    t[row:row + 4096] = torch.randn((min(4096, shape[0] - row), *shape[1:]), generator=gen) * 0.02
            tensors[name] = t
            weight_map[name] = shard
            total += t.numel() * t.element_size()
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def run_prune(model: Path, out: Path, ids: Path, method: str, n: int, t: int, device: str, dtype: str,
              grad_dtype: str = "float32", offload: str = "cpu", prefetch: bool = True,
              chunk_windows: int | None = None) -> dict:
    base, _, update = method.partition("+")  # e.g. gblm+lsq: --method gblm --update lsq
    cmd = [sys.executable, "-m", "cli.main", "prune", str(model), str(out), "--method", base, "--calib-ids", str(ids),
           "--nsamples", str(n), "--seqlen", str(t), "--device", device, "--dtype", dtype, "--offload", offload,
           "--grad-dtype", grad_dtype, "--prefetch" if prefetch else "--no-prefetch", "-q"]
    if update:
        cmd += ["--update", update]
    if chunk_windows is not None:
        cmd += ["--chunk-windows", str(chunk_windows)]
    timed = Path("/usr/bin/time").is_file()
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"prune --method {method} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    report = json.loads((out / "prune_report.json").read_text())
    phase = next(p for p in report["phases"] if p["phase"] == "prune_sweep")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    return {"method": method, "wall_s": round(wall, 2), "prune_sweep_s": round(phase["seconds"], 2),
            "peak_rss_bytes": max(p["peak_rss_bytes"] for p in report["phases"]),
            "device_peak_bytes": max(p["device_peak_allocated_bytes"] for p in report["phases"]),
            "phases": report["phases"], "max_rss_time_v_bytes": int(m.group(1)) * 1024 if m else None,
            "bytes_read": phase["bytes_read"], "bytes_written": phase["bytes_written"],
            "compute_dtype": report.get("compute_dtype"), "engine_predicted": report.get("predicted")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="llama-7b | llama-13b | llama-2-70b | smollm2-4x | tiny")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--inter", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: wanda and gblm; base+update runs --method base --update update (e.g. gblm+lsq)")
    ap.add_argument("--grad-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="GBLM gradient files (bfloat16: half the disk)")
    ap.add_argument("--offload", default="cpu", choices=["cpu", "disk"],
                    help="activation store: cpu (RAM) or disk (positional I/O, out of the page cache)")
    ap.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                    help="do not read the next block ahead (one block less host RAM)")
    ap.add_argument("--chunk-windows", type=int, default=None,
                    help="windows per reduction chunk (default: the engine's ceil(N/8))")
    args = ap.parse_args()

    cfg = shape_config(args)
    model_bytes = sum(numel(s) for _, s in tensor_shapes(cfg)) * 2
    methods = args.methods or ["wanda", "gblm"]
    args.out.mkdir(parents=True, exist_ok=True)
    for m in methods:  # outputs of an earlier run are not kept: free their space before counting it
        shutil.rmtree(args.out / f"pruned-{m}", ignore_errors=True)
    model = args.out / f"{args.shape}-random"
    # the checkpoint plus the planner's disk peak of the worst method (one pruned copy at a time; GBLM's
    # gradient files shrink as the output grows), 1 GiB slack
    shape_json = args.out / f"{args.shape}.config.json"
    shape_json.write_text(json.dumps(cfg))
    run_disk = max(plan(load_shape(shape_json), PlanSettings(m, args.nsamples, args.seqlen, offload=args.offload,
                                                             head_chunk="auto", grad_dtype=args.grad_dtype,
                                                             prefetch=args.prefetch, chunk_windows=args.chunk_windows),
                        Budgets(), baseline=0).disk_bytes for m in methods)
    have = model_bytes if (model / "model.safetensors.index.json").is_file() else 0
    need = model_bytes - have + run_disk + 2**30
    free = shutil.disk_usage(args.out).free
    if free < need:
        hint = "" if args.grad_dtype == "bfloat16" or "gblm" not in methods else \
            ", or --grad-dtype bfloat16 (half the gradient files)"
        raise SystemExit(f"--out {args.out}: {fmt_size(free)} free, this run needs about {fmt_size(need)} "
                         f"(the {fmt_size(model_bytes)} checkpoint, {fmt_size(run_disk)} for the run's own files, "
                         f"1 GiB slack); choose a folder on a larger disk{hint}")
    t0 = time.perf_counter()
    if not (model / "model.safetensors.index.json").is_file():
        write_checkpoint(model, cfg)
    write_s = time.perf_counter() - t0
    ids = args.out / "calib_ids.safetensors"
    save_ids(ids, torch.randint(cfg["vocab_size"], (args.nsamples, args.seqlen),
                                generator=torch.Generator().manual_seed(0)))
    base = baseline_rss()
    rows = []
    for method in methods:
        out = args.out / f"pruned-{method}"
        shutil.rmtree(out, ignore_errors=True)
        row = run_prune(model, out, ids, method, args.nsamples, args.seqlen, args.device, args.dtype,
                        args.grad_dtype, args.offload, args.prefetch, args.chunk_windows)
        device = "cpu" if args.device == "cpu" else "cuda"
        pred = plan(load_shape(model), PlanSettings(method, args.nsamples, args.seqlen, device=device,
                                                    offload=args.offload, compute_dtype=row["compute_dtype"] or "auto",
                                                    head_chunk="auto", grad_dtype=args.grad_dtype,
                                                    prefetch=args.prefetch, chunk_windows=args.chunk_windows),
                    Budgets(gpu_memory=None if device == "cpu" else 2**40), baseline=base)
        ran = [p["phase"] for p in row["phases"]]  # the phases this run had (no eval here)
        row["predicted_host_peak_bytes"] = max(pred.phase(p).host_peak_bytes for p in ran)
        row["predicted_host_by_phase"] = {p: pred.phase(p).host_peak_bytes for p in ran}
        row["predicted_device_peak_bytes"] = max(pred.phase(p).device_peak_bytes for p in ran)
        row["host_error"] = round(row["predicted_host_peak_bytes"] / row["peak_rss_bytes"] - 1, 4)
        row["predicted_disk_bytes"] = pred.disk_bytes
        rows.append(row)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)

    print(f"{args.shape}: {cfg['num_hidden_layers']} blocks, d={cfg['hidden_size']}, ffn={cfg['intermediate_size']}, "
          f"vocab {cfg['vocab_size']}; checkpoint {fmt_size(model_bytes)} bf16 written in {write_s:.1f} s; "
          f"{args.nsamples} x {args.seqlen} tokens, device {args.device}; baseline RSS {fmt_size(base)}")
    print(f"{'method':<14}{'wall s':>8}{'sweep s':>9}{'peak RSS':>12}{'time -v':>12}{'predicted':>12}{'error':>8}"
          f"{'read':>12}{'MB/s read':>10}")
    for r in rows:
        tv = fmt_size(r["max_rss_time_v_bytes"]) if r["max_rss_time_v_bytes"] else "-"
        rate = r["bytes_read"] / 1e6 / max(r["prune_sweep_s"], 1e-9)
        print(f"{r['method']:<14}{r['wall_s']:>8.1f}{r['prune_sweep_s']:>9.1f}{fmt_size(r['peak_rss_bytes']):>12}"
              f"{tv:>12}{fmt_size(r['predicted_host_peak_bytes']):>12}{r['host_error']:>+8.1%}"
              f"{fmt_size(r['bytes_read']):>12}{rate:>10.1f}")
    print(f"{'method':<14}{'phase':<16}{'seconds':>9}{'peak RSS':>12}{'RssAnon':>12}{'RssFile':>12}{'predicted':>12}"
          f"{'error':>8}{'written':>12}")
    for r in rows:
        for ph in r["phases"]:
            want = r["predicted_host_by_phase"][ph["phase"]]
            anon, file = (fmt_size(ph.get(f"peak_rss_{k}_bytes") or 0) for k in ("anon", "file"))
            print(f"{r['method']:<14}{ph['phase']:<16}{ph['seconds']:>9.1f}{fmt_size(ph['peak_rss_bytes']):>12}"
                  f"{anon:>12}{file:>12}"
                  f"{fmt_size(want):>12}{want / ph['peak_rss_bytes'] - 1:>+8.1%}{fmt_size(ph['bytes_written']):>12}")
    print(json.dumps({"shape": args.shape, "config": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size",
                      "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")},
                      "model_bytes": model_bytes, "nsamples": args.nsamples, "seqlen": args.seqlen,
                      "device": args.device, "grad_dtype": args.grad_dtype, "baseline_rss_bytes": base,
                      "offload": args.offload, "prefetch": args.prefetch, "chunk_windows": args.chunk_windows,
                      "runs": rows}, sort_keys=True))


if __name__ == "__main__":
    main()
