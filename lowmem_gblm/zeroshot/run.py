"""Run lm-evaluation-harness tasks on the streamed model: ``lowmem-gblm eval MODEL --tasks ...``."""

from __future__ import annotations

import logging
import time
from importlib.metadata import version

from lowmem_gblm.calib.data import load_tokenizer
from lowmem_gblm.config import EvalConfig
from lowmem_gblm.engine.evaluate import checkpoint_sparsity, evaluate_checkpoint, evaluate_images
from lowmem_gblm.engine.modality import adapter
from lowmem_gblm.engine.run import open_model
from lowmem_gblm.errors import InputError, UsageError, first_line
from lowmem_gblm.io.model import StreamedModel
from lowmem_gblm.memory.tracker import PhaseTracker
from lowmem_gblm.ranks import env_world
from lowmem_gblm.runtime import resolve_device, resolve_dtype
from lowmem_gblm.zeroshot import require_lm_eval
from lowmem_gblm.zeroshot.diagnose import config_problems, task_problem, through_package, unreadable_yamls

log = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")  # reported when a task has them


def task_metrics(results: dict) -> dict[str, dict]:
    """lm-eval's ``results["results"]`` -> {task: {metric: value}} with the filter suffix (",none") dropped;
    every numeric metric is kept, acc / acc_norm and their stderr first."""
    out = {}
    for task, row in results.get("results", {}).items():
        metrics = {}
        for key, value in row.items():
            name, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "sample_len":
                metrics[name] = float(value)
        ordered = {k: metrics[k] for k in METRICS if k in metrics}
        out[task] = ordered | {k: v for k, v in metrics.items() if k not in ordered}
        count = results.get("n-samples", {}).get(task, {}).get("effective")
        if count is not None:
            out[task]["samples"] = int(count)
    return out


def task_manager(tasks: tuple[str, ...], include_path: str | None):
    """lm-eval's TaskManager. Indexing lm-eval's own ~14k task configs takes seconds, so when every task is
    found under ``include_path`` only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = (f" or under --include-path {include_path}" if include_path
                 else " (pass --include-path DIR for local ones)")
        skipped = unreadable_yamls(include_path) if include_path else []
        why = f"; lm-eval skipped {len(skipped)} YAML file(s) there: {', '.join(skipped[:3])}" if skipped else ""
        raise InputError(f"--tasks: unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}{why}")
    return manager


def run_tasks(lm, config: EvalConfig, manager) -> dict:
    """lm-eval's ``simple_evaluate``. A task it cannot build or run is an InputError naming the cause
    (zeroshot.diagnose); an error raised through this package's own code stays a bug."""
    from lm_eval import simple_evaluate

    problem = config_problems(manager, config.tasks)
    if problem:
        raise InputError(f"--tasks {','.join(config.tasks)}: {problem}")
    try:
        return simple_evaluate(model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot,
                               limit=config.limit, task_manager=manager, log_samples=False)
    except UsageError:
        raise
    except Exception as exc:
        if isinstance(exc, MemoryError) or through_package(exc.__traceback__):
            raise
        problems = (task_problem(manager, t, config.limit, config.num_fewshot) for t in config.tasks)
        problem = next((p for p in problems if p), None) or f"{type(exc).__name__}: {first_line(exc)}"
        raise InputError(f"--tasks {','.join(config.tasks)}: lm-eval cannot run it: {problem}") from exc


def evaluate_tasks(config: EvalConfig, model: StreamedModel | None = None) -> dict:
    """lm-eval's tasks on the streamed checkpoint: dict(tasks={task: metrics}, lm_eval=version, phase stats).
    ``model``: the checkpoint, already opened."""
    require_lm_eval()
    if env_world() > 1:
        raise UsageError("--tasks runs in one process; start it without torchrun / accelerate launch")
    from lowmem_gblm.zeroshot.lm import StreamedLM

    model = model or open_model(config.model_dir)
    tokenizer = load_tokenizer(config.model_dir)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, model.checkpoint_dtype())
    manager = task_manager(config.tasks, config.include_path)
    lm = StreamedLM(model, tokenizer, device, dtype, config.batch_size, config.pass_tokens, config.prefetch,
                    config.head_chunk, config.progress)
    t0 = time.perf_counter()
    with PhaseTracker("zeroshot", device) as tracker:
        results = run_tasks(lm, config, manager)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    metrics = task_metrics(results)
    log.info("zero-shot: %s in %.1fs on %s/%s", ", ".join(
        f"{t} acc {m.get('acc', float('nan')):.4f}" for t, m in metrics.items()), time.perf_counter() - t0,
        device, dtype)
    return {"tasks": metrics, "lm_eval": version("lm_eval"),
            "num_fewshot": config.num_fewshot, "limit": config.limit, "phase": tracker.stats.to_dict()}


def evaluate(config: EvalConfig) -> dict:
    """``lowmem-gblm eval``: perplexity on ``--data`` (engine.evaluate) and/or lm-eval's ``--tasks``, the
    checkpoint's sparsity, and one phase record per part (eval, zeroshot)."""
    if config.images or config.pixels:
        return evaluate_images(config)
    model = open_model(config.model_dir)
    adapter(model).refuse_eval(model, config.model_dir, "--data" if config.data else "--tasks")
    result = evaluate_checkpoint(config, model) if config.data else {"phases": []}  # the model opened once
    if config.tasks:
        zeroshot = evaluate_tasks(config, model)
        result["phases"].append(zeroshot.pop("phase"))
        result |= zeroshot
        if "sparsity" not in result:
            result["sparsity"] = checkpoint_sparsity(model)["overall"]
    return result
