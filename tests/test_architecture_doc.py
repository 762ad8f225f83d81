"""docs/architecture.md cannot drift: every dotted name it cites in backticks exists (a module, or an attribute
of one), and every file path it cites is in the repository."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def _resolve(dotted: str) -> object:
    """The module or attribute a dotted name names: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_dotted_name_exists():
    names = sorted(set(re.findall(r"`((?:lowmem_gblm|cli)(?:\.\w+)*)`", DOC.read_text())))
    assert len(names) > 20  # the page names the parts it describes
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name} ({exc})")
    assert not missing, missing


def test_every_cited_file_exists():
    paths = set(re.findall(r"`((?:lowmem_gblm|tests|benchmarks|docs)/[\w./]+\.(?:py|json|md))`", DOC.read_text()))
    assert paths
    assert not [p for p in sorted(paths) if not (ROOT / p).is_file()]
