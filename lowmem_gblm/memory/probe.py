"""Device bytes of one block's steps (and the head's), measured on fake tensors; the host baseline.

One decoder block of the real transformers class is built from the model's config (on meta, as the
engine does), given fake weights, and run under ``FakeTensorMode`` for one sample through the engine's
own step functions: the prune sweep's forward with the real statistics hooks and ``methods.apply.
prune_linear`` on every linear, the gradient sweep's ``stream.backward.block_windows`` with fp32
accumulators, the head's ``stream.backward.head_windows`` and eval's ``stream.head.window_nll``. A
dispatch mode counts the bytes of every live (fake) storage and keeps the peak. Nothing is allocated
for real.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_gblm.io.model import ClassifierHead, StreamedModel, linear_names
from lowmem_gblm.mask import Pattern
from lowmem_gblm.memory.shape import ModelShape
from lowmem_gblm.methods import LinearJob, MethodOptions, SharedFactors, get_method
from lowmem_gblm.methods.apply import finished_statistics, prune_linear, statistics_needed
from lowmem_gblm.runtime import dtype_bytes
from lowmem_gblm.stream import backward
from lowmem_gblm.stream.context import BlockContext, KindInputs, run_block
from lowmem_gblm.stream.head import HEAD_DTYPE, window_nll
from lowmem_gblm.stream.stats import STATISTICS, by_expert, collect_inputs
from lowmem_gblm.units import fmt_size, prod

ACC_BYTES = dtype_bytes(backward.ACC_DTYPE)  # fp32 statistics, accumulators and scores
CUDA_HOST_ESTIMATE = 2**30  # host RSS a CUDA process adds over a CPU one (see cuda_host_bytes)
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowmem_gblm"


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

    def untrack(self, t: torch.Tensor) -> None:
        """Stop counting ``t``'s storage (it stands for bytes held elsewhere; the peak is not lowered)."""
        self.now -= self.live.pop(t.untyped_storage()._cdata, 0)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.now


@dataclass(frozen=True)
class Probe:
    """Device bytes measured on fake tensors, per step; every value includes the weights then live."""

    prune_step: int  # block + statistics + one sample forward, then every linear's prune
    grad_step: int  # block + fp32 accumulators + one sample recompute forward and backward
    forward_step: int  # block + one sample forward (eval)
    head_grad: int  # final norm + head + one window's loss and gradient
    head_eval: int  # final norm + fp32 head + one window's loss
    notes: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()  # the linears that share one set of input statistics (same input)


def _fake_block(shape: ModelShape, dtype: torch.dtype, device: torch.device):
    block = StreamedModel(Path("."), shape.config, shape.family, index=None).build_block(0)
    state = {k: torch.empty(v, dtype=dtype, device=device) for k, v in shape.block_shapes.items()}
    block.load_state_dict(state, strict=True, assign=True)  # as StreamedModel.load_block
    block.requires_grad_(False)
    if shape.family.experts is not None:
        experts = block.get_submodule(shape.family.experts.module)
        experts.forward = partial(_experts_bound, experts)
    return block.eval()


def _experts_bound(experts, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Fake tensors cannot route (the expert loop's nonzero has a data-dependent shape): each of the top-k
    choices sends every token through one expert instead. That is the routing's worst case: the forward holds
    one expert's [tokens, 2I] at a time, as the loop does for its busiest expert, and the backward saves
    top_k x tokens of intermediates, which is what the loop saves in total."""
    out = torch.zeros_like(hidden)
    for k in range(top_k_index.shape[-1]):
        gate, up = F.linear(hidden, experts.gate_up_proj[0]).chunk(2, dim=-1)
        out = out + F.linear(experts.act_fn(gate) * up, experts.down_proj[0]) * top_k_weights[:, k, None]
    return out


def _fake_ctx(shape: ModelShape, seqlen: int, dtype: torch.dtype, device: torch.device) -> BlockContext:
    """BlockContext.build's structure on fake tensors: per attention kind, rotary tables and, for sliding
    layers, a [1, 1, T, T] bool mask (full layers use SDPA's causal path); vision: none."""
    if shape.family.vision:
        return BlockContext(None, (), {})
    head_dim = getattr(shape.config, "head_dim", None) or shape.hidden // shape.config.num_attention_heads
    kinds = tuple(shape.family.layer_kinds(shape.config))
    inputs = {}
    for kind in set(kinds):
        cos = torch.empty(1, seqlen, head_dim, dtype=dtype, device=device)
        mask = (torch.empty(1, 1, seqlen, seqlen, dtype=torch.bool, device=device)
                if kind == "sliding_attention" else None)
        inputs[kind] = KindInputs((cos, torch.empty_like(cos)), mask)
    return BlockContext(torch.arange(seqlen, device=device).unsqueeze(0), kinds, inputs)


def _fake_head(shape: ModelShape, dtype: torch.dtype, device: torch.device):
    """(final norm, head weight [V, D]) in ``dtype``, as StreamedModel.load_head."""
    d = shape.hidden
    with torch.device("meta"):
        norm = shape.family.cls("norm_class")(d, eps=getattr(shape.config, "rms_norm_eps", 1e-6))
    norm.load_state_dict({"weight": torch.empty(d, dtype=dtype, device=device)}, assign=True)
    norm.requires_grad_(False)
    return norm.eval(), torch.empty(shape.vocab, d, dtype=dtype, device=device)


def _vision_head(shape: ModelShape, dtype: torch.dtype, device: torch.device, batch: int, seqlen: int,
                 mem) -> tuple[int, int]:
    """(head_grad, head_eval) of a vision transformer's head (io.model.ClassifierHead): the gradient sweep's
    classifier_windows on a batch, and one image's logits."""
    d, fam = shape.hidden, shape.family
    features = 2 * d if fam.pooling == "cls+mean" else d
    with torch.device("meta"):
        norm, classifier = nn.LayerNorm(d), nn.Linear(features, shape.vocab)
    norm.load_state_dict({k: torch.empty(d, dtype=dtype, device=device) for k in ("weight", "bias")}, assign=True)
    classifier.load_state_dict({"weight": torch.empty(shape.vocab, features, dtype=dtype, device=device),
                                "bias": torch.empty(shape.vocab, dtype=dtype, device=device)}, assign=True)
    head = ClassifierHead(norm, classifier, fam.pooling).requires_grad_(False)
    sample = torch.empty(batch, seqlen, d, dtype=dtype, device=device)  # in the store: not counted
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    base = mem.now
    mem.reset_peak()
    loss, grad, _ = backward.classifier_windows(head, sample, labels, device, dtype)
    del loss, grad
    head_grad = mem.peak - base
    mem.reset_peak()
    with torch.no_grad():
        logits = head(sample[:1])
    del logits
    return head_grad, mem.peak - base


def probe(shape: ModelShape, method: str, seqlen: int, dtype: torch.dtype, nsamples: int,
          head_chunk: int | None, batch: int = 1, solver: str = "auto") -> Probe:
    """Run one block's steps on fake tensors and return their device peaks. ``batch``: windows per call
    (--batch-size: the sweeps' forwards, the gradient sweep's head and backward); ``head_chunk``: predicted
    positions per head call (None: the window); ``solver``: --solver of --update lsq."""
    # A fake CPU device: this torch may have no CUDA, and autograd needs a real device guard.
    # CPU SDPA (flash for CPU) keeps O(T) memory like CUDA's flash / memory-efficient kernels.
    device = torch.device("cpu")
    meth = get_method(method)
    options = MethodOptions(solver=solver)
    pattern = Pattern.parse("unstructured", 0.5)
    notes: list[str] = []
    d = shape.hidden
    with FakeTensorMode(allow_non_fake_inputs=False), LiveBytes() as mem:
        # -- prune sweep: statistics forward of one micro-batch, then prune every linear (methods.apply)
        block = _fake_block(shape, dtype, device)
        ctx = _fake_ctx(shape, seqlen, dtype, device)
        names = linear_names(block)
        modules = dict(block.named_modules())
        wanted = statistics_needed(meth, STATISTICS)
        # the checkpoint's stored bytes of each linear: held on the host for the shard (a host term)
        stored = {n: torch.empty(modules[n].weight.shape, dtype=shape.storage_dtype, device=device) for n in names}
        for t in stored.values():
            mem.untrack(t)
        mem.reset_peak()
        # as the engine: linears reading the same input share one set of statistics (and its factorization)
        with torch.no_grad(), collect_inputs(block, names, wanted, share=True) as accs:
            x = torch.empty(batch, seqlen, d, dtype=dtype, device=device)  # stream.sweep.forward's micro-batch
            y = run_block(block, ctx, x)
            del x, y
        groups = accs.groups() if wanted else tuple((n,) for n in names)
        factors = SharedFactors()
        for name, stats, _first in finished_statistics(accs, names, nsamples):  # methods.apply.BlockPruner.prune
            linear = modules[name]
            if meth.needs_gradients:
                stats["gradient"] = torch.empty(linear.weight.shape, dtype=backward.ACC_DTYPE, device=device)
            job = LinearJob(f"model.layers.0.{name}.weight", linear.weight.data, stats, pattern, options,
                            factors=factors)
            try:
                written = prune_linear(job, meth, stored.pop(name), device, dtype)
            except Exception as exc:  # data-dependent ops cannot run on fake tensors
                o, i = linear.weight.shape
                extra = (meth.scratch_bytes(o, i) if meth.scratch_bytes is not None
                         else o * i * (ACC_BYTES * 3 + 8 + 1) + i * i * ACC_BYTES)
                mem.peak = max(mem.peak, mem.now + extra)
                notes.append(f"{method} prune of {name}: {type(exc).__name__} on fake tensors; "
                             f"counted {fmt_size(extra)} analytically")
                written = None
            del stats, job, written
        del factors, accs
        x = torch.empty(batch, seqlen, d, dtype=dtype, device=device)
        with torch.no_grad():
            y = run_block(block, ctx, x)  # the pruned block's forward, stats hooks gone
            y_dense = torch.empty_like(y)  # the dense outputs it replaces, read back (the report's output error)
        del x, y, y_dense
        prune_step = mem.peak

        # -- eval: a plain forward of one sample
        mem.reset_peak()
        x = torch.empty(1, seqlen, d, dtype=dtype, device=device)
        with torch.no_grad():
            y = run_block(block, ctx, x)
        del x, y
        forward_step = mem.peak

        # -- gradient sweep: its own step (stream.backward.block_windows) on a batch of windows: recompute
        # forward, backward of the incoming gradient, fold each window's gradient into fp32 accumulators. Two
        # calls, as the loop runs them. The stored windows and incoming gradient live in the store (host).
        linears, accum = backward.grad_accumulators(block, names, device)
        sample = torch.empty(batch, seqlen, d, dtype=dtype, device=device)
        incoming = torch.empty(batch, seqlen, d, dtype=dtype, device=device)
        in_store = 2 * batch * seqlen * d * dtype_bytes(dtype)
        mem.reset_peak()
        for _ in range(2):
            g = backward.block_windows(block, ctx, linears, accum, sample, incoming, "l1", device, dtype)
            del g  # g_out.put copies it to the store
        grad_step = mem.peak - in_store
        del sample, incoming
        del block, ctx, linears, accum, modules, stored
        gc.collect()
        leftover = mem.now  # nothing of the block steps should stay; do not charge it to the head

        if shape.family.vision:  # a layernorm and a [classes, D] classifier on one pooled row per image: small
            head_grad, head_eval = _vision_head(shape, dtype, device, batch, seqlen, mem)
            return Probe(prune_step, grad_step, forward_step, head_grad, head_eval, tuple(notes), groups)
        # -- the gradient sweep's head (stream.backward.head_windows), two batches as its loop runs them
        norm, head = _fake_head(shape, dtype, device)
        sample = torch.empty(batch, seqlen, d, dtype=dtype, device=device)  # in the store: not counted
        labels = torch.zeros(batch, seqlen - 1, dtype=torch.long, device=device)
        mem.reset_peak()
        for _ in range(2):
            loss, grad = backward.head_windows(norm, head, sample, labels, device, dtype, chunk=head_chunk)
            del loss, grad  # g_in.put copies the gradient to the store
        head_grad = mem.peak - leftover - prod(sample.shape) * dtype_bytes(dtype)
        del sample, labels, norm, head

        # -- eval's head (stream.head.window_nll): fp32 norm and head, one window's loss (measured from what
        # is alive now: no second full gc.collect, which costs ~0.4 s in a process with transformers loaded)
        base = mem.now
        mem.reset_peak()
        norm, head = _fake_head(shape, HEAD_DTYPE, device)
        hidden = torch.empty(seqlen, d, dtype=dtype, device=device)
        targets = torch.zeros(seqlen - 1, dtype=torch.long, device=device)
        # its float() of the first (or only) chunk's loss is data-dependent: the peak is reached by then
        with contextlib.suppress(DataDependentOutputException):
            window_nll(norm, head, hidden, targets, chunk=head_chunk)
        head_eval = mem.peak - base
    return Probe(prune_step, grad_step, forward_step, head_grad, head_eval, tuple(notes), groups)


_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {}  # input_groups' cache: family and config -> groups


def input_groups(shape: ModelShape) -> tuple[tuple[str, ...], ...]:
    """Every pruned unit of a block (``shape.linear_shapes``), grouped by the input it reads: the sets of statistics
    ``stream.stats.collect_inputs(share=True)`` makes (one Hessian, one factorization per group). Linears: found as
    the engine finds them, by one forward of a 2-token window through a fake block 0; expert units: one group per
    (fused parameter, expert) (``by_expert``). Cached per family and config."""
    key = f"{shape.family.name}|{shape.config.to_json_string()}"
    if key not in _GROUPS:
        device = torch.device("cpu")
        with FakeTensorMode(allow_non_fake_inputs=False):
            block = _fake_block(shape, torch.float32, device)
            ctx = _fake_ctx(shape, 2, torch.float32, device)
            with torch.no_grad(), collect_inputs(block, linear_names(block), frozenset({"scaler_row"}),
                                                 share=True) as accs:
                run_block(block, ctx, torch.empty(1, 2, shape.hidden, device=device))
            found = list(accs.groups())
            del block, ctx, accs
        experts = StreamedModel(Path("."), shape.config, shape.family, index=None).expert_units
        found += [tuple(units) for units in by_expert(experts, list(experts)).values()]
        units = set(shape.linear_shapes)
        found = [g for g in (tuple(n for n in group if n in units) for group in found) if g]
        placed = {n for group in found for n in group}
        found += [(n,) for n in shape.linear_shapes if n not in placed]
        _GROUPS[key] = tuple(found)
    return _GROUPS[key]


def baseline_rss(refresh: bool = False, device: str = "cpu") -> int:
    """RSS of a python process that imported torch, transformers and this package and ran one tiny
    block forward and backward on ``device`` (kernels, thread pools, on CUDA the context and cuBLAS
    loaded). Measured once in a subprocess and cached."""
    key = f"{sys.executable}|{torch.__version__}|{transformers.__version__}|{device}|{_installed_sha()}"
    cache = _CACHE / f"baseline_rss{'' if device == 'cpu' else '_' + device}.json"
    if not refresh and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return int(data["rss"])
        except (json.JSONDecodeError, KeyError, ValueError):
            pass
    code = (
        "import torch, cli.main, lowmem_gblm.engine\n"
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


def _installed_sha() -> str:
    """A digest of every installed distribution and version: installing or upgrading any package (which may
    change what importing transformers pulls in) invalidates the cached baseline."""
    from importlib.metadata import distributions

    names = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


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
