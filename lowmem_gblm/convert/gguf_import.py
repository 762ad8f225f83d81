"""Import a GGUF file (llama.cpp format) as an ordinary sharded Hugging Face safetensors checkpoint.

Quantized GGUF tensors are dequantized by transformers (``GgufConfig(dequantize=True)``, which needs
the ``gguf`` package: ``pip install lowmem-gblm[gguf]``) and written in ``dtype``; the output
folder holds ``config.json`` (without any quantization entry), ``generation_config.json``, the
safetensors shards with their index, and the tokenizer. The whole model is materialized once on
the CPU: this is a one-off conversion of small models, not a streamed step.

Note that pruning a dequantized model prunes the *dequantized* weights: its dense baseline is the
quantized model, not the original full-precision release.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import torch

from lowmem_gblm.convert.outdir import prepare_out_dir, write_mark, written_files
from lowmem_gblm.errors import InputError, UsageError, first_line
from lowmem_gblm.runtime import COMPUTE_DTYPES, dtype_name, named_dtype

log = logging.getLogger(__name__)

GGUF_TRANSFORMERS = "5.17"  # the first transformers with GgufConfig (dequantize=True); the gguf extra pins it


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if dtype_name(dtype) not in COMPUTE_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    return named_dtype(dtype_name(dtype))


def _transformers_gguf():
    """(AutoModelForCausalLM, AutoTokenizer, GgufConfig), or a clear error on a transformers without GgufConfig."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:
        raise UsageError(f"import-gguf needs transformers >= {GGUF_TRANSFORMERS} (GgufConfig), this is "
                         f"{transformers.__version__}; pip install 'lowmem-gblm[gguf]' or "
                         f"'transformers>={GGUF_TRANSFORMERS}'") from None
    return AutoModelForCausalLM, AutoTokenizer, GgufConfig




def _strip_quantization(out_dir: Path) -> None:
    """The weights are plain tensors now; a leftover quantization entry would mislead loaders."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_complete(gguf_path: Path) -> None:
    """Read the file's header, metadata and tensor table with the gguf package's reader, which also checks that
    every tensor's bytes are in the file: a file cut short (an interrupted download) or not a GGUF at all is an
    InputError here, not a struct.error deep inside transformers."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf_path)
    except Exception as exc:  # the reader's way of meeting a short or garbled file: struct/Index/Value/...Error
        raise InputError(f"{gguf_path}: not a complete GGUF file ({type(exc).__name__}: {first_line(exc, 160)}); "
                         "an interrupted download? fetch it again") from None


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str | torch.dtype = "float32",
                shard_size: str = "500MB", overwrite: bool = False) -> Path:
    """Dequantize ``gguf_path`` and write a sharded safetensors checkpoint to ``out_dir``; return it."""
    AutoModelForCausalLM, AutoTokenizer, GgufConfig = _transformers_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    if not gguf_path.is_file():
        raise InputError(f"GGUF file {gguf_path} does not exist")
    check_complete(gguf_path)
    prepare_out_dir(out_dir, overwrite)
    write_mark(out_dir, {"gguf": str(gguf_path)}, None)  # started: a rerun with --overwrite may replace what it leaves
    folder, name = str(gguf_path.parent), gguf_path.name
    t0 = time.perf_counter()
    log.info("gguf import: reading and dequantizing %s to %s", gguf_path, torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch_dtype,
        )
    except ImportError as exc:
        raise InputError(f"gguf import needs the gguf package ({exc}); pip install 'gguf>=0.10'") from exc
    except (ValueError, KeyError, OSError, struct.error) as exc:
        raise InputError(f"{gguf_path}: cannot load as a causal LM ({first_line(exc)})") from exc
    n_params = sum(p.numel() for p in model.parameters())
    log.info("gguf import: %s, %.1f M parameters loaded in %.1fs",
             type(model).__name__, n_params / 1e6, time.perf_counter() - t0)
    model.config.dtype = torch_dtype
    model.save_pretrained(out_dir, max_shard_size=shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _strip_quantization(out_dir)
    write_mark(out_dir, {"gguf": str(gguf_path)}, written_files(out_dir))
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    log.info("gguf import: wrote %d shard(s) and the tokenizer to %s in %.1fs",
             len(shards), out_dir, time.perf_counter() - t0)
    return out_dir
