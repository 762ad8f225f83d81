"""A small offline lm-eval task from the Wikipedia evaluation split: pick an article's true next sentence.

Each document: ``context`` = an article's first sentence, ``choices`` = its true second sentence and the
second sentences of 3 other articles, in a shuffled order, ``label`` = the index of the true one. Articles
come from the ``wiki-offline:eval`` split (calib.wiki: 1,055 of the 10,033 articles, by title hash), in
title order; an article qualifies when its first two sentences are each 20-300 characters. Distractors
and the order are drawn with ``random.Random(seed)``, so the files depend only on the JSON and the seed.

Writes into a folder (``lowmem-gblm wiki-task DIR`` or ``python -m lowmem_gblm.zeroshot.wiki_task DIR``):
``wiki_continuation.json`` (a JSON list of documents) and ``wiki_continuation.yaml`` (an lm-eval task,
``multiple_choice``, metrics acc / acc_norm, ``dataset_path: json`` over that file by its absolute path,
so regenerate it when the folder moves). Then ``lowmem-gblm eval MODEL --tasks wiki_continuation
--include-path DIR``. Needs no network and no lm-eval to generate.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from pathlib import Path

from lowmem_gblm.calib.wiki import is_eval_title, locate_wiki_json, read_articles
from lowmem_gblm.errors import InputError

log = logging.getLogger(__name__)

TASK = "wiki_continuation"
CHOICES = 4
SENTENCE_CHARS = (20, 300)  # both sentences must be this long (inclusive), in characters
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")

TASK_YAML = """\
# lowmem-gblm wiki-task: given an article's first sentence, pick its true next sentence among {choices}
# (the others are second sentences of other articles). Source: {source}, split eval, seed {seed}.
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
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def first_sentences(text: str, count: int = 2) -> list[str]:
    """The first ``count`` sentences (split after . ! ? before a capital, digit, quote or parenthesis)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip(), maxsplit=count)[:count]]


def usable(pair: list[str]) -> bool:
    lo, hi = SENTENCE_CHARS
    return len(pair) == 2 and all(lo <= len(s) <= hi for s in pair)


def build_documents(articles: dict[str, str], seed: int = 0, max_docs: int | None = None) -> list[dict]:
    """The task's documents from title -> text (eval split only, title order), deterministic in ``seed``."""
    pairs = [(t, first_sentences(articles[t])) for t in sorted(articles) if is_eval_title(t)]
    pairs = [(t, p) for t, p in pairs if usable(p)]
    if len(pairs) < CHOICES:
        raise InputError(f"wiki task: only {len(pairs)} usable evaluation article(s); need at least {CHOICES}")
    rng = random.Random(seed)
    docs = []
    for k, (title, (first, second)) in enumerate(pairs[:max_docs]):
        others = rng.sample([j for j in range(len(pairs)) if j != k], CHOICES - 1)
        choices = [second] + [pairs[j][1][1] for j in others]
        order = list(range(CHOICES))
        rng.shuffle(order)
        docs.append({"title": title, "context": first, "choices": [choices[i] for i in order],
                     "label": order.index(0)})
    return docs


def write_task(folder: str | Path, source: str | Path | None = None, seed: int = 0,
               max_docs: int | None = None) -> Path:
    """Write the JSON and the task YAML into ``folder`` (created); returns the YAML's path."""
    path = Path(source) if source is not None else locate_wiki_json()
    docs = build_documents(read_articles(path), seed, max_docs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{TASK}.json").resolve()
    data.write_text(json.dumps(docs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    yaml = folder / f"{TASK}.yaml"
    yaml.write_text(TASK_YAML.format(choices=CHOICES, source=path.name, seed=seed, task=TASK,
                                     data=json.dumps(str(data))), encoding="utf-8")
    log.info("wiki task: %d documents -> %s, %s", len(docs), data, yaml)
    return yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="where the task's JSON and YAML go (pass it as --include-path)")
    parser.add_argument("--source", help="summaries JSON (default: wiki-offline's lookup, e.g. $LOWMEM_WIKI_JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-docs", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_task(args.folder, args.source, args.seed, args.max_docs)


if __name__ == "__main__":
    main()
