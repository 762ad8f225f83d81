"""GBLM's gradients two ways, side by side in one run: the whole model in memory with autograd (as the GBLM
reference code computes them) against lowmem-gblm's streamed gradient sweep. Peak RSS and wall time of each, and
how far apart their l1 gradients are.

    python benchmarks/whole_vs_streamed_gradients.py MODEL_DIR --calib wiki-offline:calib --nsamples 2 \
        --seqlen 512 --dtype bfloat16 --work runs/whole-vs-streamed

Each side runs in its own fresh interpreter (its peak RSS is its own, ``ru_maxrss``), the streamed one first; the
whole-model side reads the streamed run's calibration windows, so both see the same tokens. The reference
(VILA-Lab/GBLM-Pruner ``gradient_computation.py``) loads the model in fp16 on GPUs, runs one backward per
calibration sample and keeps two accumulators per decoder linear: sum |g * scale| in fp16 and sum (g * scale)^2
in fp32 (scale 100). Here the model is in ``--dtype`` (fp16 matmuls are slow on CPUs: bf16 or fp32) with the same
two accumulators. Before it starts, the whole-model side's memory is predicted (weights, gradients, both
accumulators, the head's logits); if that exceeds this machine's available memory it is not started and the
prediction is the result (``--force`` starts it anyway; a kill by the kernel is reported as such).
Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SCALE = 100.0  # the reference's --scale default
MARGIN = 1.2  # the prediction leaves out activations and allocator slack (SmolLM2 2 x 128: 2.23 predicted, 2.60 GiB)
_STREAMED = r"""
import json, resource, sys, time
from cli.main import app
t0 = time.perf_counter()
try:
    app(sys.argv[1:], standalone_mode=False)
    rc = 0
except SystemExit as exc:
    rc = exc.code or 0
print("RESULT " + json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
_WHOLE = r"""
import json, resource, sys, time
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
model_dir, ids_file, dtype, out, scale = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
t0 = time.perf_counter()
ids = load_file(ids_file)["input_ids"].long()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
model.eval()
loaded = time.perf_counter() - t0
lin = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
l1 = {k: torch.zeros_like(m.weight, dtype=torch.float16) for k, m in lin.items()}
l2 = {k: torch.zeros_like(m.weight, dtype=torch.float32) for k, m in lin.items()}
for n in range(ids.shape[0]):
    model.zero_grad(set_to_none=False)
    model(ids[n:n + 1], labels=ids[n:n + 1]).loss.backward()
    for k, m in lin.items():
        g = m.weight.grad.detach().float() * scale
        l1[k] += g.abs().to(torch.float16)
        l2[k] += g * g
    print(f"sample {n + 1}/{ids.shape[0]} {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
seconds = time.perf_counter() - t0
save_file({k: (v.float() / scale).contiguous() for k, v in l1.items()}, out)
print("RESULT " + json.dumps({"rc": 0, "seconds": seconds, "load_seconds": loaded,
                               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _run(code: str, args: list[str], log: Path) -> dict:
    """``code`` in a fresh interpreter; its RESULT line, or how it ended."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][7:])
    how = "killed by the kernel (out of memory)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {"rc": proc.returncode, "failed": how, "seconds": time.perf_counter() - t0, "log": str(log)}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def predict_whole(model_dir: str, seqlen: int, dtype: str) -> dict:
    """The whole-model side's bytes: weights and their gradients in ``dtype``, the two accumulators per decoder
    linear (fp16 + fp32), the head's fp32 logits and their gradient for one window, and the interpreter."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    params = sum(p.numel() for p in model.parameters())
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layers." in n)
    terms = {"weights": params * width, "gradients": params * width, "l1 accumulators (fp16)": linears * 2,
             "l2 accumulators (fp32)": linears * 4,
             "logits and their gradient (fp32)": 2 * seqlen * config.vocab_size * 4,
             "interpreter, torch, transformers": 600 * 2**20}
    return {"terms": terms, "total": sum(terms.values()), "parameters": params, "linear_parameters": linears}


def compare(streamed_dir: Path, whole_file: Path) -> dict:
    from safetensors.torch import load_file

    ref = load_file(str(whole_file))
    meta = json.loads((streamed_dir / "gradients.json").read_text())
    got = {}
    for entry in meta["done"].values():
        got.update(load_file(str(streamed_dir / entry["file"])))
    common = sorted(set(ref) & set(got))
    per = {k: float((got[k].float() - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in common}
    worst = max(per, key=per.get)
    return {"tensors": len(common), "max_rel_to_tensor_max": per[worst], "worst": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--calib", default="wiki-offline:calib")
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--work", default="runs/whole-vs-streamed")
    p.add_argument("--force", action="store_true", help="start the whole-model side even when predicted not to fit")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    grad_dir = work / "streamed"
    streamed = _run(_STREAMED, ["gradients", a.model, str(grad_dir), "--calib", a.calib, "--nsamples",
                                str(a.nsamples), "--seqlen", str(a.seqlen), "--dtype", a.dtype, "--device", "cpu",
                                "--quiet"], work / "streamed.log")
    need, available = predict_whole(a.model, a.seqlen, a.dtype), _mem_available()
    whole: dict = {"predicted_bytes": need["total"], "available_bytes": available}
    if need["total"] * MARGIN > available and not a.force:
        whole |= {"failed": "not started: predicted to need more than this machine's available memory"}
    elif streamed.get("rc") == 0:
        whole |= _run(_WHOLE, [a.model, str(grad_dir / "calibration_ids.safetensors"), a.dtype,
                               str(work / "whole_l1.safetensors"), str(SCALE)], work / "whole.log")
    agreement = compare(grad_dir, work / "whole_l1.safetensors") if whole.get("rc") == 0 else None
    gib = 2**30
    print(f"{a.model}: {a.nsamples} x {a.seqlen} tokens, {a.dtype}, CPU")
    print(f"{'approach':<34}{'seconds':>10}{'peak RSS GiB':>14}")
    for name, r in (("streamed (lowmem-gblm gradients)", streamed), ("whole model + autograd", whole)):
        rss = f"{r['peak_rss'] / gib:.2f}" if "peak_rss" in r else r.get("failed", "-")
        print(f"{name:<34}{r.get('seconds', float('nan')):>10.1f}{rss:>14}")
    print(f"whole model predicted: {need['total'] / gib:.2f} GiB ("
          + ", ".join(f"{k} {v / gib:.2f}" for k, v in need["terms"].items()) + f"); available {available / gib:.2f}")
    if agreement:
        print(f"l1 gradients: max |streamed - whole| / max |whole| = {agreement['max_rel_to_tensor_max']:.2e} "
              f"over {agreement['tensors']} tensors (worst {agreement['worst']}; the whole side accumulates in fp16)")
    print(json.dumps({"benchmark": "whole_vs_streamed_gradients", "model": a.model, "nsamples": a.nsamples,
                      "seqlen": a.seqlen, "dtype": a.dtype, "streamed": streamed, "whole": whole,
                      "whole_predicted": need, "agreement": agreement}))


if __name__ == "__main__":
    main()
