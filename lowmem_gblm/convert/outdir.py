"""The output folder of an import: created empty, or replaced with ``--overwrite`` only where an earlier import
wrote it, never deleting a file no import wrote. Each import records what it wrote in ``IMPORT_MARK``."""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_gblm.errors import InputError
from lowmem_gblm.io.writer import atomic_write_text

IMPORT_MARK = ".lowmem-import.json"  # what an import wrote: --overwrite deletes those files and no other
# what save_pretrained writes (an import that did not finish may have left any of these)
_WRITTEN = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
            "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt")


def _previous_import(out_dir: Path) -> set[str] | None:
    """The files an earlier import wrote into ``out_dir`` (from its mark), or None when there was none.

    An import that did not finish marked only that it started: the files it may have written are the
    ones ``save_pretrained`` writes (``_WRITTEN``).
    """
    try:
        mark = json.loads((out_dir / IMPORT_MARK).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(mark, dict):
        return None
    files = mark.get("files")
    if isinstance(files, list) and all(isinstance(f, str) and f and Path(f).name == f for f in files):
        return set(files)
    return {p.name for p in out_dir.iterdir() if p.is_file() and any(p.match(g) for g in _WRITTEN)}


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``. A non-empty one is refused, unless ``overwrite`` and it holds an earlier import and
    nothing else: then that import's files are deleted (never a file an import did not write)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"OUT_DIR {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        ours = _previous_import(out_dir)
        if ours is None:
            names = sorted(p.name for p in out_dir.iterdir())
            raise InputError(f"OUT_DIR {out_dir} is not empty and holds no earlier import ({', '.join(names[:3])}"
                             f"{'...' if len(names) > 3 else ''}); choose an empty folder (nothing was deleted)")
        if not overwrite:
            raise InputError(f"OUT_DIR {out_dir} holds an earlier import; pass --overwrite to replace it, or "
                             "choose an empty folder")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours | {IMPORT_MARK})
        if foreign:
            raise InputError(f"OUT_DIR {out_dir} holds files no import wrote ({', '.join(foreign[:3])}"
                             f"{'...' if len(foreign) > 3 else ''}); --overwrite leaves them alone: move them or "
                             "choose another folder (nothing was deleted)")
        for name in sorted(ours):
            path = out_dir / name
            if path.is_file() or path.is_symlink():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_mark(out_dir: Path, source: dict[str, str], files: list[str] | None) -> None:
    """Record in ``out_dir`` what the import from ``source`` (``{"gguf": path}``) wrote; ``None``: it only started."""
    atomic_write_text(out_dir / IMPORT_MARK, json.dumps({**source, "files": files}, indent=1))


def written_files(out_dir: Path) -> list[str]:
    """The files in ``out_dir`` an import just wrote (every one but the mark)."""
    return sorted(p.name for p in out_dir.iterdir() if p.name != IMPORT_MARK)
