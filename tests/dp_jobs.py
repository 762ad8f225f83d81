"""Run a list of lowmem-gblm jobs in one process (group): ``python tests/dp_jobs.py JOBS.json`` alone, or under
``torchrun --nproc-per-node R`` (every rank runs every job; rank 0 writes). Used by tests/test_data_parallel.py.

JOBS.json: [{"kind": "prune" | "gradients" | "eval", "out": path, ...config fields}, ...]; for eval the result
is written by rank 0 to ``out`` as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from lowmem_gblm.config import CalibConfig, EvalConfig, GradientConfig, PruneConfig
from lowmem_gblm.engine import compute_gradients, evaluate_checkpoint, prune
from lowmem_gblm.ranks import close, env_rank


def main(path: str) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    for job in json.loads(Path(path).read_text()):
        kind = job.pop("kind")
        if kind == "eval":
            out = job.pop("out")
            result = evaluate_checkpoint(EvalConfig(**job))
            if env_rank() == 0:
                with open(out, "w") as f:
                    json.dump({k: result[k] for k in ("ppl", "nll", "tokens", "windows")}, f)
            continue
        calib = CalibConfig(**job.pop("calib"))
        out = job.pop("out")
        if kind == "prune":
            prune(PruneConfig(out_dir=out, calib=calib, **job))
        else:
            compute_gradients(GradientConfig(out_dir=out, calib=calib, **job))
    close()


if __name__ == "__main__":
    main(sys.argv[1])
