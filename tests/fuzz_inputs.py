"""Inputs for the second fuzz campaign (``tests/test_fuzz_inputs.py``) and the issue-32 regression tests: lm-eval
task YAMLs (a working one and its breakages), regexes that backtrack, every numeric option at its extremes, and
image folders / label CSVs. Everything is built here, offline and deterministic.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

# -- lm-eval task YAMLs --------------------------------------------------------------------------------------

DOCS = [{"context": f"the quick brown fox {i}", "choices": ["jumps over", "a lazy dog", "reads one block"],
         "label": i % 3, "text": "the quick brown fox jumps", "num": 3} for i in range(3)]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, name: str = "tiny_mc", docs: list | None = None,
               edit: Callable[[str], str] = lambda y: y) -> Path:
    """A three-document multiple-choice task in ``folder`` (its JSON beside it); ``edit`` rewrites the YAML text.
    Returns the folder (pass it as --include-path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.json"
    data.write_text(json.dumps(DOCS if docs is None else docs))
    text = TASK_YAML.format(task=name, data=json.dumps(str(data.resolve())))
    (folder / f"{name}.yaml").write_text(edit(text))
    return folder


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)
    return edit


ROLLING = _replace("output_type: multiple_choice\n", "output_type: loglikelihood_rolling\n")

# id -> (kwargs of write_task, extra eval options, a word the error line must hold; None: exit 0 or 2 will do)
TASK_CASES: dict[str, tuple[dict, list[str], str | None]] = {
    "no-dataset_path": ({"edit": _replace("dataset_path: json\n", "")}, [], "no dataset_path"),
    "missing-data-file": ({"edit": lambda y: y.replace("tiny_mc.json", "nope.json")}, [], "Unable to find"),
    "function-to-missing-module": ({"edit": _replace('doc_to_text: "{{context}}"', "doc_to_text: !function nomod.f")},
                                   [], "nomod"),
    "choice-field-missing": ({"edit": _replace("doc_to_choice: choices", "doc_to_choice: nosuchfield")}, [],
                             "doc_to_choice 'nosuchfield'"),
    "target-past-choices": ({"docs": [dict(d, label=7) for d in DOCS]}, [], "past its 3 choices"),
    "int-target-rolling": ({"edit": lambda y: ROLLING(y).replace("doc_to_choice: choices\n", "").replace(
        "doc_to_target: label", "doc_to_target: num").replace("metric: acc", "metric: word_perplexity")}, [],
        "where lm-eval needs text"),
    "fewshot-above-docs": ({}, ["--num-fewshot", "5"], "--num-fewshot 5"),
    "json-without-data_files": ({"edit": _replace("dataset_kwargs:\n  data_files:\n", "dataset_kwargs:\n")}, [],
                                "no dataset_kwargs.data_files"),
    "yaml-syntax-error": ({"edit": lambda y: y.replace("dataset_path: json", "dataset_path: [json")}, [],
                          "line 3"),
    "yaml-empty": ({"edit": lambda y: ""}, [], "(empty)"),
}


def task_fuzz_cases(seed: int = 32, count: int = 12) -> dict[str, tuple[dict, list[str], str | None]]:
    """Random damage to the working task: a line dropped, a value replaced by junk, the text cut, the documents
    emptied or given other fields. Fixed seed: the same cases every run."""
    rng = random.Random(seed)
    lines = TASK_YAML.splitlines(keepends=True)
    junk = ["", "null", "[]", "{}", "-1", "999999999999999999999", "nan", "'{{nope}}'", "!function x.y", "[[", "~"]
    cases: dict[str, tuple[dict, list[str], str | None]] = {}
    while len(cases) < count:
        kind = rng.choice(["drop", "junk", "cut", "docs"])
        if kind == "drop":
            i = rng.randrange(len(lines))
            cases[f"drop-line-{i}"] = ({"edit": lambda y, i=i: "".join(
                ln for k, ln in enumerate(y.splitlines(keepends=True)) if k != i)}, [], None)
        elif kind == "junk":
            i, value = rng.randrange(len(lines)), rng.choice(junk)
            cases[f"junk-line-{i}:{value}"] = ({"edit": lambda y, i=i, v=value: "".join(
                (ln.split(":")[0] + ": " + v + "\n" if k == i and ":" in ln else ln)
                for k, ln in enumerate(y.splitlines(keepends=True)))}, [], None)
        elif kind == "cut":
            keep = rng.randrange(1, len(TASK_YAML))
            cases[f"cut-at-{keep}"] = ({"edit": lambda y, keep=keep: y[:keep]}, [], None)
        else:
            docs = rng.choice([[], [{}], [{"context": 1, "choices": "abc", "label": "x"}],
                               [dict(d, choices=[]) for d in DOCS], [dict(d, label=-1) for d in DOCS],
                               [dict(d, context=None) for d in DOCS]])
            cases[f"docs-{json.dumps(docs[:1])[:40]}"] = ({"docs": docs}, [], None)
    return cases


# -- regexes ---------------------------------------------------------------------------------------------------

NASTY_REGEXES = [r"(([a-z_.0-9])+)+!", r"(a|aa)+$", r"(.*a){20}", r"(x+x+)+y", r"^(\w+\s?)*$", r"((.)*)*#",
                 r"(?<=q)_proj", r"(q)\1", r"a{1001}", r"(?x) q", r"proj\Z", "(", "[", "*", "", ".", r"\d+",
                 r"layers\.1\.", "\x00", "\u00e9", "a" * 5000]

# -- numeric options at their extremes ----------------------------------------------------------------------------

INT_EXTREMES = [-(2**63), -1, 0, 1, 2**31 - 1, 2**31, 2**63, 10**30]
FLOAT_EXTREMES = ["nan", "inf", "-inf", "-0.0", "5e-324", "1e308", "0", "1", "-1"]
SIZE_EXTREMES = ["0", "-1", "1e400GiB", "99999999999999999999999TiB", "nan", "1B", ".5", "GiB"]

# command -> {option: (kind, extra options it needs)}
NUMERIC_OPTIONS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "prune": {
        "--nsamples": ("int", []), "--seqlen": ("int", []), "--seed": ("int", []), "--batch-size": ("int", []),
        "--head-chunk": ("int", ["--method", "gblm"]), "--checkpoint-every": ("int", ["--method", "gblm"]),
        "--chunk-windows": ("int", []), "--blocksize": ("int", ["--method", "sparsegpt"]),
        "--solver-max-iter": ("int", ["--update", "lsq", "--solver", "iterative"]),
        "--gradual-steps": ("int", ["--update", "gradual"]),
        "--sparsity": ("float", []), "--alpha": ("float", ["--method", "gblm"]),
        "--percdamp": ("float", ["--method", "sparsegpt"]),
        "--owl-lambda": ("float", ["--layer-sparsity", "owl"]), "--owl-m": ("float", ["--layer-sparsity", "owl"]),
        "--solver-tol": ("float", ["--update", "lsq", "--solver", "iterative"]),
        "--ridge": ("float", ["--update", "lsq"]),
        "--cpu-memory": ("size", []), "--gpu-memory": ("size", []), "--disk-space": ("size", []),
    },
    "eval": {
        "--seqlen": ("int", []), "--max-windows": ("int", []), "--batch-size": ("int", []),
        "--head-chunk": ("int", []), "--chunk-windows": ("int", []),
    },
    "plan": {
        "--nsamples": ("int", []), "--seqlen": ("int", []), "--head-chunk": ("int", []), "--batch-size": ("int", []),
        "--checkpoint-every": ("int", []), "--chunk-windows": ("int", []), "--nproc": ("int", []),
        "--cpu-memory": ("size", []), "--gpu-memory": ("size", []), "--disk-space": ("size", []),
    },
}


def extremes(kind: str) -> list[str]:
    return [str(v) for v in {"int": INT_EXTREMES, "float": FLOAT_EXTREMES, "size": SIZE_EXTREMES}[kind]]


# -- image folders and label CSVs -----------------------------------------------------------------------------

def _png(path: Path, size=(28, 28), mode: str = "RGB", colour=(10, 20, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode in ("RGB", "RGBA") else 7).save(path)


def image_cases() -> dict[str, Callable[[Path], None]]:
    """id -> fn(folder) that writes an image folder (class folders named as the config's LABEL_k) with one damaged
    or odd file beside a good one."""
    def with_good(extra: Callable[[Path], None]) -> Callable[[Path], None]:
        def fn(folder: Path) -> None:
            _png(folder / "LABEL_0" / "good.png")
            extra(folder / "LABEL_1")
        return fn

    def raw(name: str, data: bytes) -> Callable[[Path], None]:
        def fn(d: Path) -> None:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
        return fn

    def cut(d: Path) -> None:
        _png(d / "cut.png")
        (d / "cut.png").write_bytes((d / "cut.png").read_bytes()[:40])

    return {
        "empty-file": with_good(raw("zero.png", b"")),
        "text-as-png": with_good(raw("text.png", b"not an image at all\n")),
        "random-bytes": with_good(raw("noise.jpg", random.Random(5).randbytes(300))),
        "cut-png": with_good(cut),
        "grayscale": with_good(lambda d: _png(d / "gray.png", mode="L")),
        "rgba": with_good(lambda d: _png(d / "alpha.png", mode="RGBA")),
        "one-pixel": with_good(lambda d: _png(d / "dot.png", size=(1, 1))),
        "wide": with_good(lambda d: _png(d / "wide.png", size=(2000, 1))),
        "other-size": with_good(lambda d: _png(d / "big.png", size=(35, 28))),
        "unknown-class": lambda f: [_png(f / c / "a.png") for c in ("LABEL_0", "zebra")] and None,
        "no-images": lambda f: (f / "LABEL_0").mkdir(parents=True),
        "nested-deeper": lambda f: _png(f / "LABEL_0" / "sub" / "a.png"),
    }


LABEL_ROWS = {  # id -> the CSV's text (a flat folder of a.png, b.png)
    "good": "a.png,LABEL_0\nb.png,LABEL_1\n",
    "bom": "\ufeffa.png,LABEL_0\nb.png,LABEL_1\n",
    "header": "file,label\na.png,LABEL_0\nb.png,LABEL_1\n",
    "empty": "",
    "one-column": "a.png\nb.png\n",
    "extra-columns": "a.png,LABEL_0,x\nb.png,LABEL_1,y\n",
    "unknown-file": "a.png,LABEL_0\nzzz.png,LABEL_1\n",
    "unknown-label": "a.png,LABEL_0\nb.png,zebra\n",
    "int-labels": "a.png,0\nb.png,1\n",
    "int-past-classes": "a.png,0\nb.png,99999999999999999999\n",
    "negative": "a.png,-1\nb.png,0\n",
    "duplicate": "a.png,LABEL_0\na.png,LABEL_1\nb.png,LABEL_1\n",
    "quotes": '"a.png","LABEL_0"\n"b.png\n',
    "nul": "a.png,LABEL_0\x00\nb.png,LABEL_1\n",
}


def write_flat(folder: Path, labels: str | bytes) -> Path:
    """A flat folder of a.png and b.png and its labels CSV (returned)."""
    _png(folder / "a.png")
    _png(folder / "b.png", colour=(200, 100, 0))
    csv = folder.parent / f"{folder.name}-labels.csv"
    csv.write_bytes(labels if isinstance(labels, bytes) else labels.encode("utf-8"))
    return csv
