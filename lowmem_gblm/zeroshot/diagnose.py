"""Why an lm-eval task cannot run, in one line (``eval --tasks``).

lm-eval meets a broken task deep inside its own code: a task YAML without ``dataset_path`` is a TypeError about
``NoneType``, ``doc_to_choice`` naming a missing field is "malformed node or string", a target past the choices an
IndexError, ``--num-fewshot`` above the documents "Sample larger than population". These functions find the cause
once a run failed: the task's YAML, then its documents through the task's own ``doc_to_*``, then the few-shot
pool. A YAML under ``--include-path`` that lm-eval skipped (a syntax error, an empty file) is named when a task is
not found.
"""

from __future__ import annotations

import types
from pathlib import Path

import yaml

import lowmem_gblm
from lowmem_gblm.errors import first_line

PACKAGE = Path(lowmem_gblm.__file__).resolve().parent
MAX_DOCS = 1000  # documents checked per task (all of them up to --limit)


def through_package(tb: types.TracebackType | None) -> bool:
    """Whether an exception passed through this package below the frame that caught it (the streamed LM's
    methods that lm-eval calls): then it is ours, a bug, not the task's."""
    tb = tb.tb_next if tb is not None else None  # the catching frame itself
    while tb is not None:
        if PACKAGE in Path(tb.tb_frame.f_code.co_filename).resolve().parents:
            return True
        tb = tb.tb_next
    return False


def unreadable_yamls(folder: str | Path) -> list[str]:
    """'NAME (why)' for each ``*.yaml`` under ``folder`` that is not a YAML mapping: a syntax error (its line), an
    empty file. Tags such as ``!function`` are not resolved (``yaml.compose`` only parses)."""
    out = []
    for path in sorted(Path(folder).rglob("*.yaml")):
        try:
            node = yaml.compose(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
            out.append(f"{path.name} ({getattr(exc, 'problem', None) or first_line(exc, 120)}{_where(exc)})")
            continue
        if node is None:
            out.append(f"{path.name} (empty)")
        elif not isinstance(node, yaml.MappingNode):
            out.append(f"{path.name} (a YAML {node.id}, not a mapping of task settings)")
    return out


def _where(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f", line {mark.line + 1}" if mark is not None else ""


def _fields(doc) -> str:
    return ", ".join(sorted(map(str, doc))) if isinstance(doc, dict) else type(doc).__name__


LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders that read the user's own files


def config_problem(cfg: dict | None) -> str | None:
    """A task YAML's own mistake: no ``dataset_path`` (lm-eval: a TypeError about NoneType), or a file builder
    (``dataset_path: json``) without ``dataset_kwargs.data_files`` or ``data_dir`` (datasets then searches the
    current folder, every subfolder, for data files: minutes in a large tree)."""
    if not isinstance(cfg, dict) or "task" not in cfg:
        return None
    if not any(k in cfg for k in ("dataset_path", "custom_dataset", "class")):
        return "its YAML has no dataset_path (e.g. dataset_path: json with dataset_kwargs.data_files)"
    kwargs = cfg.get("dataset_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    if cfg.get("dataset_path") in LOCAL_BUILDERS and not (kwargs.get("data_files") or kwargs.get("data_dir")):
        return (f"dataset_path {cfg['dataset_path']} reads local files, but its YAML gives no "
                "dataset_kwargs.data_files (datasets would search the current folder for them)")
    return None


def config_problems(manager, names) -> str | None:
    """The first ``config_problem`` among the named tasks' YAMLs (groups are left to lm-eval), before any is
    loaded."""
    index = getattr(manager, "task_index", None) or {}
    for name in names:
        entry = index.get(name)
        problem = config_problem(getattr(entry, "cfg", None))
        if problem:
            where = getattr(entry, "yaml_path", None)
            return f"task {name}: {problem}" + (f" ({where})" if where else "")
    return None


def document_problem(task, limit: int | None) -> str | None:
    """The first document the task's ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` cannot be built for,
    or whose target does not fit its kind (an index past the choices, a number where text belongs)."""
    kind = getattr(task, "OUTPUT_TYPE", None)
    cfg = getattr(task, "config", None)
    for i, doc in enumerate(task.eval_docs):
        if i >= min(limit or MAX_DOCS, MAX_DOCS):
            break
        parts = {}
        for part in ("doc_to_text", "doc_to_target") + (("doc_to_choice",) if kind == "multiple_choice" else ()):
            try:
                parts[part] = getattr(task, part)(doc)
            except Exception as exc:  # the task's template or function, on this document
                return (f"document {i}: {part} {getattr(cfg, part, '?')!r} fails ({type(exc).__name__}: "
                        f"{first_line(exc, 120)}); does it name a field of the documents? they have: {_fields(doc)}")
        target, choices = parts["doc_to_target"], parts.get("doc_to_choice")
        if kind == "multiple_choice":
            if not isinstance(choices, list | tuple) or not choices:
                return (f"document {i}: doc_to_choice {getattr(cfg, 'doc_to_choice', '?')!r} gives "
                        f"{str(choices)[:80]!r}, not a list of choices; the documents have: {_fields(doc)}")
            for t in target if isinstance(target, list) else [target]:
                if isinstance(t, int) and not 0 <= t < len(choices):
                    return f"document {i}: target {t} is past its {len(choices)} choices (0..{len(choices) - 1})"
        elif kind in ("loglikelihood", "loglikelihood_rolling", "generate_until") and not isinstance(target, str):
            return (f"document {i}: doc_to_target gives {target!r} ({type(target).__name__}); a {kind} task "
                    "needs text there")
    return None


def fewshot_problem(task, num_fewshot: int | None) -> str | None:
    """``--num-fewshot N`` above the documents the examples are drawn from (the document itself excluded when
    they come from the evaluated split)."""
    if not num_fewshot:
        return None
    pool = task.fewshot_docs()
    size = 0 if pool is None else len(pool)
    own = not (task.has_training_docs() or task.has_validation_docs()) and getattr(
        getattr(task, "config", None), "fewshot_split", None) is None
    if size - own < num_fewshot:
        return (f"--num-fewshot {num_fewshot}: it has {size} document(s) to draw examples from"
                f"{' (the evaluated document excluded)' if own else ''}; pass --num-fewshot {max(0, size - own)} "
                "or fewer")
    return None


def load_problem(exc: BaseException) -> str | None:
    """lm-eval builds a task's first document while it constructs the task: a ``doc_to_*`` that fails there, or
    a target index past the choices, is found in the traceback's frames (the step, the document's fields)."""
    step = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        name, local = frame.f_code.co_name, frame.f_locals
        if name in ("doc_to_text", "doc_to_target", "doc_to_choice") and "doc" in local:
            step = (name, local.get("self"), local.get("doc"))
        elif isinstance(exc, IndexError) and isinstance(local.get("test_choice"), list | tuple) and isinstance(
                local.get("test_target"), int):
            n = len(local["test_choice"])
            return f"document 0: target {local['test_target']} is past its {n} choices (0..{n - 1})"
        tb = tb.tb_next
    if step is None:
        return None
    part, task, doc = step
    return (f"document 0: {part} {getattr(getattr(task, 'config', None), part, '?')!r} fails "
            f"({type(exc).__name__}: {first_line(exc, 120)}); does it name a field of the documents? they have: "
            f"{_fields(doc)}")


def leaf_tasks(loaded: dict) -> list[tuple[str, object]]:
    """(name, Task) of every task in lm-eval's (possibly nested, by group) task dict."""
    out = []
    for key, value in loaded.items():
        if isinstance(value, dict):
            out += leaf_tasks(value)
        elif value is not None:
            out.append((getattr(key, "group_name", None) or str(key), value))
    return out


def task_problem(manager, name: str, limit: int | None, num_fewshot: int | None) -> str | None:
    """What is wrong with task ``name``, or None when nothing is found (the error then speaks for itself)."""
    from lm_eval.tasks import get_task_dict

    problem = config_problems(manager, [name])
    if problem:
        return problem
    try:
        loaded = get_task_dict([name], manager)
    except Exception as exc:  # lm-eval's way of meeting a task it cannot build
        return f"task {name}: " + (load_problem(exc) or f"cannot be loaded: {type(exc).__name__}: {first_line(exc)}")
    for task_name, task in leaf_tasks(loaded):
        try:
            problem = document_problem(task, limit) or fewshot_problem(task, num_fewshot)
        except Exception as exc:
            problem = f"its documents cannot be read ({type(exc).__name__}: {first_line(exc, 160)})"
        if problem:
            return f"task {task_name}: {problem}"
    return None
