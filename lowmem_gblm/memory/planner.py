"""The planner: predicted device / host / disk peaks per phase, and settings that fit the budgets.

Device terms come from the real code path: one decoder block of the real transformers class is
built from config.json (on meta, as the engine does), given fake weights, and run under
``FakeTensorMode`` for one sample -- the prune sweep's forward with the real statistics hooks and
the real method's prune of every linear, the gradient sweep's recompute forward and one-sample
backward with fp32 accumulators, the head's chunked loss and gradient. A dispatch mode counts the
bytes of every live (fake) storage and keeps the peak. Nothing is allocated for real.

The stores (calibration boundaries, the incoming-gradient buffer, accumulators, output shards) are
added analytically, as is the host side: a measured python + torch + transformers baseline RSS,
stores kept in RAM, the block read from disk in its storage dtype, and everything the device holds
when the device is the CPU.

Phases (the names in the report): ``gradient_sweep`` (GBLM only), ``prune_sweep``, ``eval``.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_gblm.config import GRAD_DTYPES
from lowmem_gblm.errors import InputError, UsageError

log = logging.getLogger(__name__)

PHASES = ("gradient_sweep", "prune_sweep", "eval")
HEAD_CHUNKS = (None, 512, 128)  # tokens per head call, tried in this order (None: the whole window)
ACC_BYTES = 4  # fp32 statistics, accumulators and scores
_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowmem_gblm"


def parse_size(text: str | int | float | None) -> int | None:
    """'24GiB', '6GB', '512MiB', '1.5g', 1234 -> bytes (binary for K/M/G/T alone). None stays None."""
    if text is None or isinstance(text, int | float):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read the size {text!r}; write it like 24GiB, 6GB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# ---------------------------------------------------------------------------------------------
# live-bytes tracking of fake tensors


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while it is alive; ``peak`` is the maximum.

    Storages are keyed by their implementation pointer (views and in-place ops add nothing) and
    dropped by a weakref finalizer, so the count follows Python's frees exactly as an allocator would.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        self.live[key] = st.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.now


# ---------------------------------------------------------------------------------------------
# the model from its config.json


@dataclass
class ModelShape:
    name: str
    config: object
    family: object
    num_blocks: int
    hidden: int
    vocab: int
    storage_dtype: torch.dtype
    block_shapes: dict[str, tuple[int, ...]]  # names relative to the block
    linear_shapes: dict[str, tuple[int, int]]  # linear name -> [out, in]
    tied: bool

    @property
    def block_numel(self) -> int:
        return sum(_prod(s) for s in self.block_shapes.values())

    @property
    def linear_numel(self) -> int:
        return sum(o * i for o, i in self.linear_shapes.values())

    @property
    def non_block_numel(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def model_bytes(self) -> int:
        return (self.num_blocks * self.block_numel + self.non_block_numel) * _dsize(self.storage_dtype)


def load_shape(path: str | Path) -> ModelShape:
    """A config.json path or a model folder (weights not needed: shapes come from the config)."""
    from transformers import AutoConfig

    from lowmem_gblm.io.layout import family_for
    from lowmem_gblm.io.model import StreamedModel, linear_names

    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise InputError(f"{path}: no config.json here; pass a model folder or a config.json file")
    try:
        raw = json.loads(cfg_file.read_text())
        kind = raw.pop("model_type")
        config = AutoConfig.for_model(kind, **raw)
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise InputError(f"{cfg_file}: not a usable Hugging Face config.json ({exc})") from exc
    config._attn_implementation = "sdpa"  # as the engine (io.model.load_hf_config)
    family = family_for(config)
    shell = StreamedModel(cfg_file.parent, config, family, index=None)
    block = shell.build_block(0)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    modules = dict(block.named_modules())
    linears = {n: (modules[n].out_features, modules[n].in_features) for n in linear_names(block)}
    storage = _config_dtype(raw) or torch.float16
    if path.is_dir():
        storage = _checkpoint_dtype(path) or storage
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return ModelShape(cfg_file.parent.name if path.is_dir() else cfg_file.stem, config, family,
                      int(config.num_hidden_layers), int(config.hidden_size), int(config.vocab_size),
                      storage, shapes, linears, tied)


def _config_dtype(raw: dict) -> torch.dtype | None:
    name = raw.get("dtype") or raw.get("torch_dtype")
    return _NAMED.get(str(name).removeprefix("torch.")) if name else None


def _checkpoint_dtype(folder: Path) -> torch.dtype | None:
    try:
        from lowmem_gblm.io.checkpoint import CheckpointIndex
        from lowmem_gblm.runtime import storage_dtype

        index = CheckpointIndex(folder)
        name = next(n for n in index.names() if ".layers." in n)
        return storage_dtype(index.tensors[name].dtype)
    except (InputError, StopIteration):
        return None


# ---------------------------------------------------------------------------------------------
# probes: one block (and the head) under FakeTensorMode


@dataclass(frozen=True)
class Probe:
    """Device bytes measured on fake tensors, per step; every value includes the weights then live."""

    prune_step: int  # block + statistics + one sample forward, then every linear's prune
    grad_step: int  # block + fp32 accumulators + one sample recompute forward and backward
    forward_step: int  # block + one sample forward (eval)
    head_grad: int  # final norm + head + one window's loss and gradient
    head_eval: int  # final norm + head + one window's loss
    notes: tuple[str, ...] = ()


def _fake_block(shape: ModelShape, mode, dtype: torch.dtype, device: torch.device):
    from lowmem_gblm.io.model import StreamedModel

    block = StreamedModel(Path("."), shape.config, shape.family, index=None).build_block(0)
    state = {k: torch.empty(v, dtype=dtype, device=device) for k, v in shape.block_shapes.items()}
    block.load_state_dict(state, strict=True, assign=True)  # as StreamedModel.load_block
    block.requires_grad_(False)
    return block.eval()


def _fake_ctx(shape: ModelShape, seqlen: int, dtype: torch.dtype, device: torch.device):
    from lowmem_gblm.stream.context import BlockContext

    head_dim = getattr(shape.config, "head_dim", None) or shape.hidden // shape.config.num_attention_heads
    cos = torch.empty(1, seqlen, head_dim, dtype=dtype, device=device)
    return BlockContext(torch.arange(seqlen, device=device).unsqueeze(0), (cos, torch.empty_like(cos)))


def probe(shape: ModelShape, method: str, seqlen: int, dtype: torch.dtype, nsamples: int,
          head_chunk: int | None, sparsity: float = 0.5,
          batch: int = 1) -> Probe:
    """Run one block's steps on fake tensors and return their device peaks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_gblm.config import CalibConfig, PruneConfig
    from lowmem_gblm.io.model import linear_names
    from lowmem_gblm.methods import LinearJob, get_method
    from lowmem_gblm.stream.context import run_block
    from lowmem_gblm.stream.head import head_loss_and_grad
    from lowmem_gblm.stream.stats import STATISTICS, collect_inputs

    # A fake CPU device: this torch may have no CUDA, and autograd needs a real device guard.
    # CPU SDPA (flash for CPU) keeps O(T) memory like CUDA's flash / memory-efficient kernels.
    device = torch.device("cpu")
    meth = get_method(method)
    options = PruneConfig(model_dir=".", out_dir=".", calib=CalibConfig(ids_file="x"), method=method,
                          sparsity=sparsity)
    notes: list[str] = []
    d = shape.hidden
    with FakeTensorMode(allow_non_fake_inputs=False), LiveBytes() as mem:
        # -- prune sweep: statistics forward of one sample, then prune every linear (pipeline.prune_block)
        block = _fake_block(shape, None, dtype, device)
        ctx = _fake_ctx(shape, seqlen, dtype, device)
        names = linear_names(block)
        modules = dict(block.named_modules())
        wanted = frozenset(s for s in meth.needs if s in STATISTICS)
        mem.reset_peak()
        with torch.no_grad(), collect_inputs(block, names, wanted) as accs:
            x = torch.empty(batch, seqlen, d, dtype=dtype, device=device)  # pipeline.forward_all micro-batch
            y = run_block(block, ctx, x)
            del x, y
            for name in names:
                linear = modules[name]
                stats = {s: accs[name][s].result(nsamples) for s in wanted}
                if "gradient" in meth.needs:
                    stats["gradient"] = torch.empty(linear.weight.shape, dtype=torch.float32, device=device)
                job = LinearJob(f"model.layers.0.{name}.weight", linear.weight.data, stats, options.parsed_pattern,
                                options)
                try:
                    keep = meth.prune(job)
                except Exception as exc:  # data-dependent ops cannot run on fake tensors
                    o, i = linear.weight.shape
                    extra = o * i * (ACC_BYTES * 3 + 8 + 1) + i * i * ACC_BYTES
                    mem.peak = max(mem.peak, mem.now + extra)
                    notes.append(f"{method} prune of {name}: {type(exc).__name__} on fake tensors; "
                                 f"counted {fmt_size(extra)} analytically")
                    keep = None
                written = torch.empty(linear.weight.shape, dtype=dtype, device=device)  # pruned copy back
                linear.weight.data.copy_(written)
                del stats, job, keep, written
                accs[name].clear()
        x = torch.empty(batch, seqlen, d, dtype=dtype, device=device)
        with torch.no_grad():
            y = run_block(block, ctx, x)  # the pruned block's forward, stats hooks gone
        del x, y
        prune_step = mem.peak

        # -- eval: a plain forward of one sample
        mem.reset_peak()
        x = torch.empty(1, seqlen, d, dtype=dtype, device=device)
        with torch.no_grad():
            y = run_block(block, ctx, x)
        del x, y
        forward_step = mem.peak

        # -- gradient sweep: the sweep's own per-sample step (stream.gradients.block_sample): recompute
        # forward, backward of the incoming gradient, fold into fp32 accumulators. Two samples, as the loop
        # runs them. The stored sample and incoming gradient live in the store (host): not counted here.
        from lowmem_gblm.stream import gradients as sweep

        weights = {n: modules[n].weight for n in names}
        for w in weights.values():
            w.requires_grad_(True)
        accum = {n: torch.zeros(w.shape, dtype=sweep.ACC_DTYPE, device=device) for n, w in weights.items()}
        sample = torch.empty(1, seqlen, d, dtype=dtype, device=device)
        incoming = torch.empty(1, seqlen, d, dtype=dtype, device=device)
        stored = 2 * seqlen * d * _dsize(dtype)
        mem.reset_peak()
        for _ in range(2):
            g = sweep.block_sample(block, ctx, weights, accum, sample, incoming, "l1", device, dtype)
            del g  # g_out.put copies it to the store
        grad_step = mem.peak - stored
        del sample, incoming
        del block, ctx, weights, accum, modules, linear
        gc.collect()
        leftover = mem.now  # nothing of the block steps should stay; do not charge it to the head

        # -- head: final norm + lm_head, one window's loss (and gradient)
        norm_cls = shape.family.cls("norm_class")
        with torch.device("meta"):
            norm = norm_cls(d, eps=getattr(shape.config, "rms_norm_eps", 1e-6))
        norm.load_state_dict({"weight": torch.empty(d, dtype=dtype, device=device)}, assign=True)
        norm.requires_grad_(False)
        head_w = torch.empty(shape.vocab, d, dtype=dtype, device=device)
        ids = torch.zeros(1, seqlen, dtype=torch.long, device=device)
        heads = {}
        # the gradient sweep's head: stream.gradients.head_sample, two samples as its loop runs them
        sample = torch.empty(1, seqlen, d, dtype=dtype, device=device)  # in the store: not counted
        labels = torch.zeros(seqlen - 1, dtype=torch.long, device=device)
        mem.reset_peak()
        for _ in range(2):
            loss, grad = sweep.head_sample(norm, head_w, sample, labels, device, dtype)
            del loss, grad  # g_in.put copies the gradient to the store
        heads[True] = mem.peak - leftover - _prod(sample.shape) * _dsize(dtype)
        del sample, labels
        # eval's head (not the sweep's): one window's loss, optionally in token chunks
        mem.reset_peak()
        h = torch.empty(1, seqlen, d, dtype=dtype, device=device)
        loss, grad = head_loss_and_grad(norm, head_w, h, ids, head_chunk, False)
        del h, loss, grad
        heads[False] = mem.peak - leftover
    return Probe(prune_step, grad_step, forward_step, heads[True], heads[False], tuple(notes))


# ---------------------------------------------------------------------------------------------
# host baseline


def baseline_rss(refresh: bool = False, device: str = "cpu") -> int:
    """RSS of a python process that imported torch, transformers and this package and ran one tiny
    block forward and backward on ``device`` (kernels, thread pools, on CUDA the context and cuBLAS
    loaded). Measured once in a subprocess and cached."""
    import transformers

    key = f"{sys.executable}|{torch.__version__}|{transformers.__version__}|{device}"
    cache = _CACHE / f"baseline_rss{'' if device == 'cpu' else '_' + device}.json"
    if not refresh and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return int(data["rss"])
        except (json.JSONDecodeError, KeyError, ValueError):
            pass
    code = (
        "import torch, cli.main, lowmem_gblm.pipeline\n"
        "from transformers import LlamaConfig\n"
        "from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding\n"
        "from lowmem_gblm.memory.tracker import current_rss\n"
        "c = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)\n"
        "c._attn_implementation = 'sdpa'\n"
        f"dev = torch.device({device!r}); x = torch.zeros(1, 16, 64, device=dev, requires_grad=True)\n"
        "p = torch.arange(16, device=dev)[None]; layer = LlamaDecoderLayer(c, 0).to(dev)\n"
        "layer(x, position_ids=p, position_embeddings=LlamaRotaryEmbedding(c).to(dev)(x, p)).sum().backward()\n"
        "print(current_rss())\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         check=True)
    rss = int(out.stdout.strip().splitlines()[-1])
    try:
        _CACHE.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "rss": rss}))
    except OSError:
        pass
    return rss


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class PhasePlan:
    name: str
    device_peak_bytes: int
    host_peak_bytes: int
    disk_bytes: int
    terms: dict[str, dict[str, int]] = field(default_factory=dict)  # device/host/disk -> term -> bytes

    def dominant(self, where: str) -> tuple[str, int]:
        items = self.terms.get(where, {})
        return max(items.items(), key=lambda kv: kv[1]) if items else ("", 0)


@dataclass
class Plan:
    model: str
    method: str
    nsamples: int
    seqlen: int
    budgets: dict[str, int | None]  # gpu_memory, cpu_memory, disk_free
    settings: dict  # device, compute_dtype, store_dtype, offload, head_chunk, grad_dtype, ...
    phases: list[PhasePlan]
    fits: bool
    advice: list[str]
    notes: list[str]

    @property
    def device_peak_bytes(self) -> int:
        return max(p.device_peak_bytes for p in self.phases)

    @property
    def host_peak_bytes(self) -> int:
        return max(p.host_peak_bytes for p in self.phases)

    @property
    def disk_bytes(self) -> int:
        return max(p.disk_bytes for p in self.phases)

    def phase(self, name: str) -> PhasePlan:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "method": self.method, "nsamples": self.nsamples, "seqlen": self.seqlen,
            "device_peak_bytes": self.device_peak_bytes, "host_peak_bytes": self.host_peak_bytes,
            "disk_bytes": self.disk_bytes, "fits": self.fits, "settings": self.settings, "budgets": self.budgets,
            "phases": [asdict(p) for p in self.phases], "advice": self.advice, "notes": self.notes,
        }

    def table(self) -> str:
        g = self.budgets
        lines = [f"{self.model}: {self.method}, {self.nsamples} x {self.seqlen} tokens; budgets: device "
                 f"{_opt(g['gpu_memory'])}, host {_opt(g['cpu_memory'])}, disk {_opt(g['disk_free'])}",
                 "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
                 f"{'phase':<16}{'device peak':>14}{'host peak':>14}{'disk':>14}   largest device / host term"]
        for p in self.phases:
            dn, dv = p.dominant("device")
            hn, hv = p.dominant("host")
            lines.append(f"{p.name:<16}{fmt_size(p.device_peak_bytes):>14}{fmt_size(p.host_peak_bytes):>14}"
                         f"{fmt_size(p.disk_bytes):>14}   {dn} {fmt_size(dv)} / {hn} {fmt_size(hv)}")
        lines.append(f"{'peak':<16}{fmt_size(self.device_peak_bytes):>14}{fmt_size(self.host_peak_bytes):>14}"
                     f"{fmt_size(self.disk_bytes):>14}")
        lines.append("fits: yes" if self.fits else "fits: NO")
        lines += [f"advice: {a}" for a in self.advice]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _opt(n: int | None) -> str:
    return "unlimited" if n is None else fmt_size(n)


def _dsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _boundary_bytes(n: int, t: int, d: int, store_dtype) -> int:
    """One [N, T, D] boundary in the activation store (int8: codes + one fp32 absmax per block)."""
    from lowmem_gblm.stream.store import store_nbytes

    return store_nbytes((n, t, d), store_dtype)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _phase(name: str, device: dict[str, int], host: dict[str, int], disk: dict[str, int],
           on_cpu: bool) -> PhasePlan:
    if on_cpu:  # the compute device is the host: its terms are host terms too
        host = {**host, **{f"compute: {k}": v for k, v in device.items()}}
        device = {}
    return PhasePlan(name, sum(device.values()), sum(host.values()), sum(disk.values()),
                     {"device": device, "host": host, "disk": disk})


def predict(shape: ModelShape, method: str, nsamples: int, seqlen: int, *, device: str,
            compute_dtype: torch.dtype, store_dtype: torch.dtype | str, offload: str, head_chunk: int | None,
            baseline: int, batch: int = 1, grad_dtype: torch.dtype = torch.float32,
            eval_nsamples: int | None = None, probe_cache: dict | None = None,
            prefetch: bool = True) -> tuple[list[PhasePlan], Probe]:
    """Per-phase peaks for one choice of settings. ``store_dtype``: a float dtype or ``"int8"``
    (boundaries only; incoming-gradient buffers stay exact). ``prefetch``: one more block read
    ahead in host memory (compute dtype on the CPU, storage dtype pinned for a GPU)."""
    from lowmem_gblm.methods import get_method

    meth = get_method(method)
    key = (method, seqlen, compute_dtype, nsamples, head_chunk, batch)
    if probe_cache is not None and key in probe_cache:
        pr = probe_cache[key]
    else:
        pr = probe(shape, method, seqlen, compute_dtype, nsamples, head_chunk, batch=batch)
        if probe_cache is not None:
            probe_cache[key] = pr
    on_cpu = device == "cpu"
    n, t, d, L = nsamples, seqlen, shape.hidden, shape.num_blocks
    boundary = _boundary_bytes(n, t, d, store_dtype)
    block_store = shape.block_numel * _dsize(shape.storage_dtype)
    ahead = shape.block_numel * _dsize(compute_dtype if on_cpu else shape.storage_dtype) if prefetch else 0
    grad_file = shape.linear_numel * _dsize(grad_dtype)  # one block's gradient file on disk
    head_store = (shape.vocab * d + d) * _dsize(shape.storage_dtype)
    ids = n * t * 8
    ram = offload == "cpu"
    # read path: safetensors copies the block out in its storage dtype, then .to(device, dtype); on the
    # CPU in the same dtype that copy *is* the block (counted in the device step)
    read_host = 0 if on_cpu and compute_dtype == shape.storage_dtype else block_store
    serialized = 2 * block_store  # safetensors.torch.save: per-tensor bytes, then the joined buffer
    phases = []

    if "gradient" in meth.needs:
        phases.append(_gradient_phase(shape, pr, n, t, device=device, compute_dtype=compute_dtype, ram=ram,
                                      baseline=baseline, read_host=read_host, store_dtype=store_dtype, ahead=ahead,
                                      grad_file=grad_file))
    cuda_host = {} if on_cpu else {"CUDA runtime (context, kernels, cuBLAS; estimate)": cuda_host_bytes()}
    ws = {} if on_cpu else {"cuBLAS workspace (1 thread)": cublas_workspace_bytes()}

    # prune sweep (pipeline.run_prune_sweep): two buffers, block loaded, its stored bytes (pipeline.
    # original_tensors) for the shard, shard written
    host = {"baseline": baseline, **cuda_host, "calibration ids": ids,
            "block's stored bytes for writing (storage dtype)": block_store, "next block prefetched": ahead}
    if on_cpu and pr.prune_step < serialized:
        host["shard being serialized (2 copies)"] = serialized - pr.prune_step  # after the block is freed
    elif not on_cpu:
        host["shard being serialized (2 copies)"] = max(serialized, read_host)
    if "gradient" in meth.needs and not on_cpu:
        # read one linear at a time (stream.gradients.BlockGradients); on the CPU it is the block step's own
        host["one linear's gradient read (fp32)"] = max(o * i for o, i in shape.linear_shapes.values()) * ACC_BYTES
    if ram:
        host["two boundaries [N,T,D]"] = 2 * boundary
    dev = {"block step (weights + statistics + forward micro-batch + prune)": pr.prune_step, **ws}
    disk = {"output checkpoint": shape.model_bytes()}
    if "gradient" in meth.needs:
        # block i's gradient file goes once its shard is durable: peak at the first or the last block
        rest, blk = shape.model_bytes() - L * block_store, block_store
        disk = {"output shards + gradient files not yet consumed (peak)":
                rest + max(L * grad_file + blk, grad_file + L * blk)}
    if not ram:
        disk["two boundaries [N,T,D]"] = 2 * boundary
    p = _phase("prune_sweep", dev, host, disk, on_cpu)
    # its first step (pipeline.embed_windows) reads the embedding rows the windows use (at most N*T of
    # them), ROW_CHUNK rows at a time (io.checkpoint.read_rows): the result, one chunk and the rows
    # picked out of it, the chunked finiteness mask, then the compute-dtype copy
    from lowmem_gblm.io.checkpoint import FINITE_CHUNK, ROW_CHUNK

    rows = min(shape.vocab, n * t) * d
    sd = _dsize(shape.storage_dtype)
    first = {"baseline": baseline, **cuda_host, "calibration ids": ids,
             "embedding rows read (result + one chunk x2 + finite mask)":
             rows * sd + 2 * min(ROW_CHUNK, shape.vocab) * d * sd + min(rows, FINITE_CHUNK)}
    if compute_dtype != shape.storage_dtype:
        first["embedding rows in the compute dtype"] = rows * _dsize(compute_dtype)
    p.terms["host_stages"] = {"embedding read": sum(first.values()), "blocks": p.host_peak_bytes}
    if sum(first.values()) > p.host_peak_bytes:
        p.terms["host"], p.host_peak_bytes = first, sum(first.values())
    phases.append(p)

    # eval (streamed perplexity of the pruned model): same buffers, plain forwards, then the head
    ne = eval_nsamples or n
    eb = ne * t * d * _dsize(compute_dtype if store_dtype == "int8" else store_dtype)  # eval keeps no int8 store
    host = {"baseline": baseline, **cuda_host, "block read (storage dtype)": block_store,
            "head read (storage dtype)": 0, "next block prefetched": ahead}
    if ram:
        host["two boundaries [N,T,D]"] = 2 * eb
    dev_block = {"block step (weights + 1-sample forward)": pr.forward_step, **ws}
    dev_head = {"head step (norm + lm_head + 1-sample loss)": pr.head_eval, **ws}
    if pr.head_eval > pr.forward_step:
        host["block read (storage dtype)"] = 0
        host["head read (storage dtype)"] = head_store
    disk = {} if ram else {"two boundaries [N,T,D]": 2 * eb}
    p = _phase("eval", dev_block if pr.forward_step >= pr.head_eval else dev_head, host, disk, on_cpu)
    p.terms["device_steps"] = {"block": pr.forward_step, "head": pr.head_eval}
    phases.append(p)
    return phases, pr


def _gradient_phase(shape: ModelShape, pr: Probe, n: int, t: int, *, device: str, compute_dtype: torch.dtype,
                    ram: bool, baseline: int, read_host: int, store_dtype=None, ahead: int = 0,
                    grad_file: int | None = None) -> PhasePlan:
    """stream.gradients._sweep: boundaries and both gradient buffers are in the compute dtype.

    Host peak is the larger of two stages: the head (all L+1 boundaries, the incoming-gradient buffer
    being filled, on the CPU the head weight and one window's fp32 logits / log-softmax / gradients)
    and the first reverse block (L boundaries, both gradient buffers, the block step, accumulators
    being written). Store pages count once written (torch.empty pages are not resident before).
    """
    on_cpu = device == "cpu"
    L, d = shape.num_blocks, shape.hidden
    boundary = n * t * d * _dsize(compute_dtype)  # gradient buffers: always exact
    stored = _boundary_bytes(n, t, d, compute_dtype if store_dtype is None else store_dtype)  # inputs (int8 ok)
    acc_block = shape.linear_numel * ACC_BYTES
    common = {"baseline": baseline, "calibration ids": n * t * 8}
    if not on_cpu:
        common["CUDA runtime (context, kernels, cuBLAS; estimate)"] = cuda_host_bytes()
    grad_file = acc_block if grad_file is None else grad_file
    head_stage = dict(common)
    # the next block is read (storage-dtype bytes, then converted) on the prefetch thread meanwhile
    walk_stage = dict(common) | {"block read (storage dtype)": read_host, "next block prefetched": ahead}
    if ram:
        head_stage |= {f"boundaries {L + 1} x [N,T,D]": (L + 1) * stored, "incoming-gradient buffer": boundary}
        walk_stage |= {f"boundaries {L} x [N,T,D]": L * stored, "two gradient buffers": 2 * boundary}
    head_dev = {"head step (norm + lm_head + 1-window fp32 loss/grad)": pr.head_grad}
    block_dev = {"block step (weights + fp32 accumulators + 1-sample fwd/bwd)": pr.grad_step}
    if on_cpu:
        head_stage |= {f"compute: {k}": v for k, v in head_dev.items()}
        # a block's step, then (its weights freed) its accumulators and their file copy being written
        # (fp32: the serialized bytes; bf16: the cast, then the serialized bytes): one after the other
        write = acc_block + grad_file
        walk_stage |= ({f"compute: {k}": v for k, v in block_dev.items()} if pr.grad_step >= write
                       else {"accumulators being written (+ file copy)": write})
        dev = {}
    else:  # the incoming gradient is copied to the device; backward runs on autograd's own thread
        walk_stage["accumulators copied to the host (+ serialized copy)"] = 2 * grad_file
        block_dev["incoming gradient on the device"] = t * d * _dsize(compute_dtype)
        ws = {"cuBLAS workspaces (forward + autograd threads)": 2 * cublas_workspace_bytes()}
        dev = (head_dev if pr.head_grad >= sum(block_dev.values()) else block_dev) | ws
    stages = {"head": sum(head_stage.values()), "reverse walk": sum(walk_stage.values())}
    host = head_stage if stages["head"] >= stages["reverse walk"] else walk_stage
    disk = {f"gradient files ({'fp32' if grad_file == acc_block else 'bf16'}, all blocks)": L * grad_file}
    if not ram:
        disk |= {f"boundaries {L + 1} x [N,T,D]": (L + 1) * stored, "two gradient buffers": 2 * boundary}
    p = PhasePlan("gradient_sweep", sum(dev.values()), max(stages.values()), sum(disk.values()),
                  {"device": dev, "host": host, "disk": disk})
    p.terms["device_steps"] = {"block": sum(block_dev.values()), "head": pr.head_grad}
    p.terms["host_stages"] = stages
    return p


CUDA_HOST_ESTIMATE = 2**30  # host RSS a CUDA process adds over a CPU one (see cuda_host_bytes)


def cuda_host_bytes() -> int:
    """Host RSS the CUDA runtime adds (context, loaded kernels, cuBLAS/cuDNN handles).

    Measured in a subprocess when this machine has CUDA (cached); otherwise CUDA_HOST_ESTIMATE, read
    off the H200 run of benchmarks/results/planner_validation.md (prune-sweep RSS minus the predicted
    CPU-side terms minus the calibration-loading residue).
    """
    if not torch.cuda.is_available():
        return CUDA_HOST_ESTIMATE
    return max(baseline_rss(device="cuda") - baseline_rss(), 0)


def cublas_workspace_bytes() -> int:
    """One cuBLAS workspace, which torch takes from its caching allocator (counted in max_memory_allocated):
    CUBLAS_WORKSPACE_CONFIG, else torch's default: 4096 KiB x 8 on sm90+ (assumed when no GPU is here),
    4096 KiB x 2 + 16 KiB x 8 before."""
    cfg = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if cfg:
        parts = [int(x) for x in cfg.split(":") if x]
        return sum(parts[k] * 1024 * parts[k + 1] for k in range(0, len(parts) - 1, 2))
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
        return 4096 * 1024 * 2 + 16 * 1024 * 8
    return 4096 * 1024 * 8


def plan(config_json_or_model_dir: str | Path, method: str = "gblm", nsamples: int = 128, seqlen: int = 2048,
         gpu_memory: int | str | None = None, cpu_memory: int | str | None = None, disk_dir: str | Path | None = None,
         compute_dtype: str | torch.dtype = "auto", store_dtype: str | torch.dtype | None = None,
         offload: str | None = None, head_chunk: int | None | str = "auto",
         eval_nsamples: int | None = None, baseline: int | None = None,
         disk_space: int | str | None = None, device: str | None = None, batch_size: int = 1,
         phases: tuple[str, ...] | None = None, probe_cache: dict | None = None, prefetch: bool = True,
         grad_dtype: str | torch.dtype = "float32") -> Plan:
    """Predict per-phase peaks and choose settings that fit.

    gpu_memory: device budget (None/0: no GPU, compute on the CPU). cpu_memory: host RAM budget
    (None: unlimited). disk_dir: where the disk store and accumulators would go (its free space is
    the disk budget, unless ``disk_space`` states one).
    offload / head_chunk: fixed, or chosen (None / "auto").
    device: "cpu" / "cuda" (default: cuda when gpu_memory is given); batch_size: the prune sweep's
    forward micro-batch; phases: only these phases count (the engine plans the phases it will run);
    config_json_or_model_dir may also be a ModelShape already loaded.
    """
    from lowmem_gblm.methods import get_method

    get_method(method)
    if nsamples < 1 or seqlen < 2:
        raise UsageError("--nsamples must be >= 1 and --seqlen >= 2")
    shape = (config_json_or_model_dir if isinstance(config_json_or_model_dir, ModelShape)
             else load_shape(config_json_or_model_dir))
    gpu, cpu = parse_size(gpu_memory), parse_size(cpu_memory)
    device = device or ("cuda" if gpu else "cpu")
    cdt = _resolve(compute_dtype, device, shape.storage_dtype)
    sdt = _store_dtype(store_dtype, cdt)
    gdt = grad_dtype if isinstance(grad_dtype, torch.dtype) else _NAMED.get(grad_dtype)
    if _name(gdt) not in GRAD_DTYPES:
        raise UsageError(f"--grad-dtype must be one of {GRAD_DTYPES}, got {grad_dtype!r}")
    disk_free = parse_size(disk_space)
    if disk_free is None and disk_dir is not None:
        if not Path(disk_dir).is_dir():
            raise UsageError(f"--disk {disk_dir}: no such folder")
        disk_free = shutil.disk_usage(disk_dir).free
    max_pos = getattr(shape.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context ({max_pos} positions)")
    base = baseline if baseline is not None else baseline_rss()
    offloads = [offload] if offload else ["cpu", "disk"]
    if offload not in (None, "cpu", "disk"):
        raise UsageError(f"--offload must be cpu or disk, got {offload!r}")
    chunks = list(HEAD_CHUNKS) if head_chunk == "auto" else [None if head_chunk in (None, 0) else int(head_chunk)]
    cache: dict = {} if probe_cache is None else probe_cache
    tried = []
    wanted = phases
    for off, chunk in itertools.product(offloads, chunks):
        phases, pr = predict(shape, method, nsamples, seqlen, device=device, compute_dtype=cdt, store_dtype=sdt,
                             offload=off, head_chunk=chunk, baseline=base, batch=batch_size,
                             eval_nsamples=eval_nsamples, probe_cache=cache, prefetch=prefetch, grad_dtype=gdt)
        phases = [p for p in phases if wanted is None or p.name in wanted]
        short = _shortfalls(phases, gpu, cpu, disk_free, off, disk_dir)
        tried.append((sum(short.values()), off, chunk, phases, pr, short))
        if not short:
            break
    score, off, chunk, phases, pr, short = (tried[-1] if not tried[-1][-1]
                                            else min(tried, key=lambda r: r[0]))
    settings = {"device": device, "compute_dtype": _name(cdt), "store_dtype": _name(sdt),
                "storage_dtype": _name(shape.storage_dtype), "offload": off, "head_chunk": chunk,
                "forward_microbatch": batch_size, "grad_dtype": _name(gdt)}
    if off == "disk":
        settings["disk_dir"] = str(disk_dir) if disk_dir is not None else None
    notes = list(pr.notes)
    notes.append("device peaks measured on fake tensors (FakeTensorMode) through the real decoder layer "
                 f"{shape.family.layer_class}, SDPA; stores added analytically")
    if off == "disk":
        notes.append("disk store: memory-mapped pages count in RSS while cached but the kernel can reclaim them")
    budgets = {"gpu_memory": gpu, "cpu_memory": cpu, "disk_free": disk_free}
    advice = _advice(phases, short, gpu, cpu, off, disk_dir, method, nsamples, seqlen, _name(gdt)) if short else []
    return Plan(shape.name, method, nsamples, seqlen, budgets, settings, phases, not short, advice, notes)


def _resolve(name, device: str, storage: torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):  # as runtime.resolve_dtype
        if device == "cpu":
            return torch.float32
        return storage if storage in (torch.float16, torch.bfloat16) else torch.float32
    if name not in _NAMED:
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return _NAMED[name]


def _store_dtype(name, compute: torch.dtype) -> torch.dtype | str:
    """--store-dtype: None/auto -> the compute dtype; a float name -> its dtype; "int8" stays a name."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return compute
    if name == "int8":
        return name
    if name not in _NAMED:
        raise UsageError(f"--store-dtype must be auto, float32, bfloat16, float16 or int8, got {name!r}")
    return _NAMED[name]


def _name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _shortfalls(phases, gpu, cpu, disk_free, offload, disk_dir) -> dict[str, int]:
    """Budget name -> bytes missing (worst phase)."""
    short = {}
    if gpu:
        over = max(p.device_peak_bytes for p in phases) - gpu
        if over > 0:
            short["gpu_memory"] = over
    if cpu is not None:
        over = max(p.host_peak_bytes for p in phases) - cpu
        if over > 0:
            short["cpu_memory"] = over
    if offload == "disk" and disk_dir is None and disk_free is None:
        short["disk_dir"] = 1
    if disk_free is not None:
        over = max(p.disk_bytes for p in phases) - disk_free
        if over > 0:
            short["disk_free"] = over
    return short


def grad_dtype_knob(phases, grad_dtype: str) -> str | None:
    """``--grad-dtype bfloat16`` when fp32 gradient files are part of the phases' disk use, else None."""
    files = any("gradient files" in k for q in phases for k in q.terms.get("disk", {}))
    return "--grad-dtype bfloat16 (half the gradient files)" if files and grad_dtype == "float32" else None


def _advice(phases, short, gpu, cpu, offload, disk_dir, method, nsamples, seqlen,
            grad_dtype: str = "float32") -> list[str]:
    out = []
    if "gpu_memory" in short:
        p = max(phases, key=lambda q: q.device_peak_bytes)
        name, val = p.dominant("device")
        steps = p.terms.get("device_steps", {})
        out.append(f"device short by {fmt_size(short['gpu_memory'])} in {p.name}: {name} = {fmt_size(val)}"
                   + (f" (block {fmt_size(steps['block'])}, head {fmt_size(steps['head'])})" if steps else "")
                   + f"; lower --seqlen (now {seqlen}) or raise --gpu-memory")
    if "cpu_memory" in short:
        p = max(phases, key=lambda q: q.host_peak_bytes)
        name, val = p.dominant("host")
        fix = ("pass --disk DIR to keep the boundaries on disk (--offload disk)" if offload == "cpu"
               or disk_dir is None else f"lower --nsamples (now {nsamples}) or raise --cpu-memory")
        out.append(f"host short by {fmt_size(short['cpu_memory'])} in {p.name}: {name} = {fmt_size(val)}; {fix}")
    if "disk_dir" in short:
        out.append("the boundaries do not fit in RAM: pass --disk DIR (a folder with room for them)")
    if "disk_free" in short:
        p = max(phases, key=lambda q: q.disk_bytes)
        name, val = p.dominant("disk")
        knob = grad_dtype_knob(phases, grad_dtype)
        hint = f", or {knob}" if knob else ""
        out.append(f"disk short by {fmt_size(short['disk_free'])} in {p.name}: {name} = {fmt_size(val)}; "
                   f"free space or choose another --disk, or lower --nsamples (now {nsamples}){hint}")
    return out
