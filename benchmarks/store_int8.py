"""int8 activation store vs the exact (compute-dtype) store on a real model.

For each method: prune twice with the same calibration windows, once with ``--store-dtype auto``
(fp32 on the CPU: exact) and once with ``--store-dtype int8``; report the fraction of identical
keep-mask entries over all decoder linears, perplexity of both on the eval split, the prune time
and the store bytes (prune sweep: 2 boundaries; gradient sweep: L+1 boundaries).

    LOWMEM_WIKI_JSON=.../summaries_en-us.json python benchmarks/store_int8.py \\
        --model /work/main/assets/smollm2-135m --nsamples 16 --seqlen 256 --eval-windows 32

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open


def keep_masks(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    masks = {}
    for name, shard in index["weight_map"].items():
        if ".layers." in name and name.endswith("proj.weight"):
            with safe_open(str(out / shard), framework="pt") as f:
                masks[name] = f.get_tensor(name) != 0
    return masks


def agreement(a: dict, b: dict) -> float:
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


def real_model_args(ap: argparse.ArgumentParser) -> None:
    """The options of a prune-twice-and-compare benchmark on a real model."""
    ap.add_argument("--model", default="/work/main/assets/smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--work", default=None)


def prepare(args, prefix: str):
    """(work folder, CalibConfig of fixed wiki-offline:calib windows saved there, evaluate(path) -> ppl)."""
    from transformers import AutoTokenizer

    from lowmem_gblm.calib.data import calibration_windows, save_ids
    from lowmem_gblm.config import CalibConfig, EvalConfig
    from lowmem_gblm.engine import evaluate_checkpoint

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    ids_file = work / "calib_ids.safetensors"
    if not ids_file.is_file():
        tok = AutoTokenizer.from_pretrained(args.model)
        save_ids(ids_file, calibration_windows(tok, "wiki-offline:calib", args.nsamples, args.seqlen, 0))
    calib = CalibConfig(ids_file=str(ids_file), nsamples=args.nsamples, seqlen=args.seqlen)

    def evaluate(path: str) -> float:
        return evaluate_checkpoint(EvalConfig(str(path), "wiki-offline:eval", args.seqlen, args.eval_windows,
                                              device="cpu", progress=False))["ppl"]

    return work, calib, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    real_model_args(ap)
    ap.add_argument("--methods", nargs="+", default=["wanda", "gblm"])
    args = ap.parse_args()

    from lowmem_gblm.config import PruneConfig
    from lowmem_gblm.engine import prune
    from lowmem_gblm.io.model import StreamedModel
    from lowmem_gblm.stream.store import store_nbytes

    work, calib, evaluate = prepare(args, "store_int8-")

    model = StreamedModel.open(args.model)
    shape = (args.nsamples, args.seqlen, model.hidden_size)
    L = model.num_blocks
    rows, result = [], {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "eval_windows": args.eval_windows, "sparsity": args.sparsity, "methods": {}}
    result["dense_ppl"] = evaluate(args.model)
    for method in args.methods:
        entry = {}
        for store in ("auto", "int8"):
            out = work / f"{method}-{store}"
            t0 = time.perf_counter()
            prune(PruneConfig(model_dir=args.model, out_dir=str(out), calib=calib, method=method,
                              sparsity=args.sparsity, device="cpu", store_dtype=store, progress=False))
            entry[store] = {"seconds": time.perf_counter() - t0, "ppl": evaluate(str(out))}
        entry["mask_agreement"] = agreement(keep_masks(work / f"{method}-auto"), keep_masks(work / f"{method}-int8"))
        result["methods"][method] = entry
        rows.append((method, entry["mask_agreement"], entry["auto"]["ppl"], entry["int8"]["ppl"],
                     entry["auto"]["seconds"], entry["int8"]["seconds"]))
    exact, int8 = store_nbytes(shape, torch.float32), store_nbytes(shape, "int8")
    result["store_bytes"] = {"boundary_fp32": exact, "boundary_int8": int8, "ratio": int8 / exact,
                             "prune_sweep_fp32": 2 * exact, "prune_sweep_int8": 2 * int8,
                             "gradient_sweep_fp32": (L + 1) * exact, "gradient_sweep_int8": (L + 1) * int8}
    print(f"dense ppl {result['dense_ppl']:.3f}  ({args.eval_windows} x {args.seqlen} wiki-offline:eval)")
    print(f"{'method':8} {'keep agree':>10} {'ppl fp32':>9} {'ppl int8':>9} {'s fp32':>7} {'s int8':>7}")
    for m, a, p0, p1, s0, s1 in rows:
        print(f"{m:8} {a:10.5f} {p0:9.3f} {p1:9.3f} {s0:7.1f} {s1:7.1f}")
    sb = result["store_bytes"]
    print(f"one boundary [{args.nsamples},{args.seqlen},{model.hidden_size}]: fp32 {exact} B, int8 {int8} B "
          f"({sb['ratio']:.3f}x); gradient sweep {L + 1} boundaries: {sb['gradient_sweep_fp32']} -> "
          f"{sb['gradient_sweep_int8']} B")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
