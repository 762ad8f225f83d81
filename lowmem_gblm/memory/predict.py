"""One prediction: the per-phase device / host / disk peaks for one concrete choice of settings.

Device terms are the probe's (``memory.probe``: the engine's own steps on fake tensors); the stores and the
host side are added analytically (see ``memory.plan``). ``plan`` searches the choices; this is one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowmem_gblm.io.checkpoint import FINITE_CHUNK, ROW_CHUNK
from lowmem_gblm.memory.probe import (
    ACC_BYTES,
    Probe,
    cublas_workspace_bytes,
    cuda_host_bytes,
    input_groups,
    probe,
)
from lowmem_gblm.memory.settings import PlanSettings
from lowmem_gblm.memory.shape import ModelShape
from lowmem_gblm.runtime import dtype_bytes
from lowmem_gblm.stream.segments import boundaries_held
from lowmem_gblm.stream.store import store_nbytes


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


def _phase(name: str, device: dict[str, int], host: dict[str, int], disk: dict[str, int],
           on_cpu: bool) -> PhasePlan:
    if on_cpu:  # the compute device is the host: its terms are host terms too
        host = {**host, **{f"compute: {k}": v for k, v in device.items()}}
        device = {}
    return PhasePlan(name, sum(device.values()), sum(host.values()), sum(disk.values()),
                     {"device": device, "host": host, "disk": disk})


def _probe(shape: ModelShape, s: PlanSettings, cache: dict | None) -> Probe:
    key = (s.method, s.seqlen, s.compute_dtype, s.nsamples, s.head_chunk, s.batch_size, s.solver)
    if cache is not None and key in cache:
        return cache[key]
    pr = probe(shape, s.method, s.seqlen, s.compute_dtype, s.nsamples, s.head_chunk, batch=s.batch_size,
               solver=s.solver)
    if cache is not None:
        cache[key] = pr
    return pr


def predict(shape: ModelShape, s: PlanSettings, baseline: int,
            probe_cache: dict | None = None) -> tuple[list[PhasePlan], Probe]:
    """Per-phase peaks for one choice of settings: ``s`` resolved (``PlanSettings.resolved``) with a
    concrete offload and head_chunk. store_dtype: a float dtype or "int8" (boundaries only; incoming-
    gradient buffers stay exact). prefetch: one more block read ahead in host memory (compute dtype on
    the CPU, storage dtype pinned for a GPU)."""
    meth = s.spec
    pr = _probe(shape, s, probe_cache)
    compute_dtype, store_dtype = s.compute_dtype, s.store_dtype
    on_cpu = s.device == "cpu"
    n, t, d, L = s.local, s.seqlen, shape.hidden, shape.num_blocks  # this rank's windows
    sd = dtype_bytes(shape.storage_dtype)
    boundary = store_nbytes((n, t, d), store_dtype)
    block_store = shape.block_numel * sd
    ahead = shape.block_numel * dtype_bytes(compute_dtype if on_cpu else shape.storage_dtype) if s.prefetch else 0
    grad_file = shape.linear_numel * dtype_bytes(s.grad_dtype)  # one block's gradient file on disk
    head_store = (shape.vocab * d + d) * sd
    ids = s.input_bytes(t)  # every rank reads all the ids (images: pixel values)
    ram = s.offload == "cpu"
    # read path: safetensors copies the block out in its storage dtype, then .to(device, dtype); on the
    # CPU in the same dtype that copy *is* the block (counted in the device step)
    read_host = 0 if on_cpu and compute_dtype == shape.storage_dtype else block_store
    serialized = 2 * block_store  # safetensors.torch.save: per-tensor bytes, then the joined buffer
    phases = []

    if meth.needs_gradients:
        phases.append(_gradient_phase(shape, pr, s, ram=ram, baseline=baseline, read_host=read_host, ahead=ahead,
                                      grad_file=grad_file))
    cuda_host = {} if on_cpu else {"CUDA runtime (context, kernels, cuBLAS; estimate)": cuda_host_bytes()}
    ws = {} if on_cpu else {"cuBLAS workspace (1 thread)": cublas_workspace_bytes()}

    # prune sweep: two buffers, block loaded, its stored bytes for the shard, shard written
    host = {"baseline": baseline, **cuda_host, "calibration ids": ids,
            "block's stored bytes for writing (storage dtype)": block_store, "next block prefetched": ahead}
    if on_cpu and pr.prune_step < serialized:
        host["shard being serialized (2 copies)"] = serialized - pr.prune_step  # after the block is freed
    elif not on_cpu:
        host["shard being serialized (2 copies)"] = max(serialized, read_host)
    if meth.needs_gradients and not on_cpu:
        # read one linear at a time; on the CPU it is the block step's own
        host["one linear's gradient read (fp32)"] = max(o * i for o, i in shape.linear_shapes.values()) * ACC_BYTES
    if ram:
        host["two boundaries [N,T,D]"] = 2 * boundary
    dev = {"block step (weights + statistics + forward micro-batch + prune)": pr.prune_step, **ws}
    if s.folds:
        dev["statistics' chunk-sum totals (writer)"] = _statistics_bytes(shape, meth.needs, input_groups(shape))
    disk = {"output checkpoint": shape.model_bytes()}
    if not s.writer:
        disk = {}
        for key in ("block's stored bytes for writing (storage dtype)", "shard being serialized (2 copies)",
                    "one linear's gradient read (fp32)"):
            host.pop(key, None)
    elif meth.needs_gradients:
        # block i's gradient file goes once its shard is durable: peak at the first or the last block
        rest, blk = shape.model_bytes() - L * block_store, block_store
        disk = {"output shards + gradient files not yet consumed (peak)":
                rest + max(L * grad_file + blk, grad_file + L * blk)}
    if not ram:
        disk["two boundaries [N,T,D]"] = 2 * boundary
    p = _phase("prune_sweep", dev, host, disk, on_cpu)
    # its first step (stream.sweep.embed) reads the embedding rows the windows use (at most N*T of them),
    # ROW_CHUNK rows at a time (io.checkpoint.read_rows): the result, one chunk and the rows picked out
    # of it, the chunked finiteness mask, then the compute-dtype copy
    rows = min(shape.vocab, n * t) * d
    first = {"baseline": baseline, **cuda_host, "calibration ids": ids,
             "embedding rows read (result + one chunk x2 + finite mask)":
             rows * sd + 2 * min(ROW_CHUNK, shape.vocab) * d * sd + min(rows, FINITE_CHUNK)}
    if compute_dtype != shape.storage_dtype:
        first["embedding rows in the compute dtype"] = rows * dtype_bytes(compute_dtype)
    p.terms["host_stages"] = {"embedding read": sum(first.values()), "blocks": p.host_peak_bytes}
    if sum(first.values()) > p.host_peak_bytes:
        p.terms["host"], p.host_peak_bytes = first, sum(first.values())
    phases.append(p)

    # eval (streamed perplexity of the pruned model, as many windows as calibration): plain forwards, the head
    eb = n * t * d * dtype_bytes(compute_dtype if store_dtype == "int8" else store_dtype)  # no int8 eval store
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


def _statistics_bytes(shape: ModelShape, needs, groups: tuple[tuple[str, ...], ...]) -> int:
    """One block's input statistics (fp32): Σx² per input column and SparseGPT's [in, in] Hessian, one set per
    distinct input (``groups``: the linears reading the same input share theirs, stream.stats.collect_inputs)."""
    per = {"scaler_row": lambda i: i * ACC_BYTES, "hessian": lambda i: i * i * ACC_BYTES}
    return sum(per[n](shape.linear_shapes[g[0]][1]) for g in groups for n in needs if n in per)


def _gradient_phase(shape: ModelShape, pr: Probe, s: PlanSettings, *, ram: bool, baseline: int, read_host: int,
                    ahead: int, grad_file: int) -> PhasePlan:
    """The gradient sweep: boundaries and both gradient buffers are in the compute dtype.

    Host peak is the larger of two stages: the head (all L+1 boundaries, the incoming-gradient buffer
    being filled, on the CPU the head weight and one window's fp32 logits / log-softmax / gradients)
    and the first reverse block (L boundaries, both gradient buffers, the block step, accumulators
    being written). Store pages count once written (torch.empty pages are not resident before).
    """
    on_cpu = s.device == "cpu"
    L, d, n, t = shape.num_blocks, shape.hidden, s.local, s.seqlen  # this rank's windows
    boundary = n * t * d * dtype_bytes(s.compute_dtype)  # gradient buffers: always exact
    persisted = s.nsamples * t * d * dtype_bytes(s.compute_dtype)  # the writer's file holds every rank's windows
    stored = store_nbytes((n, t, d), s.store_dtype)  # inputs (int8 ok)
    acc_block = shape.linear_numel * ACC_BYTES
    common = {"baseline": baseline, "calibration ids": s.input_bytes(t)}
    if not on_cpu:
        common["CUDA runtime (context, kernels, cuBLAS; estimate)"] = cuda_host_bytes()
    head_stage = dict(common)
    # the next block is read (storage-dtype bytes, then converted) on the prefetch thread meanwhile
    walk_stage = dict(common) | {"block read (storage dtype)": read_host, "next block prefetched": ahead}
    k = int(s.checkpoint_every)
    held_head, held_walk = boundaries_held(L, k)
    # with k > 1 the inputs not kept pass through two scratch boundaries during the forward
    scratch = {"two scratch boundaries (forward, inputs not kept)": 2 * stored} if k > 1 else {}
    forward_stage = dict(common) | {f"boundaries {held_head} x [N,T,D]": held_head * stored} | scratch
    if ram:
        head_stage |= {f"boundaries {held_head} x [N,T,D]": held_head * stored, "incoming-gradient buffer": boundary}
        walk_stage |= {f"boundaries {held_walk} x [N,T,D]": held_walk * stored, "two gradient buffers": 2 * boundary}
    head_dev = {"head step (norm + lm_head + 1-window fp32 loss/grad)": pr.head_grad}
    block_dev = {"block step (weights + fp32 accumulators + 1-sample fwd/bwd)": pr.grad_step}
    if s.folds:  # the writer adds each chunk's accumulators into totals of the same size
        block_dev["accumulators' chunk-sum totals (writer)"] = acc_block
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
        block_dev["incoming gradient on the device"] = s.batch_size * t * d * dtype_bytes(s.compute_dtype)
        ws = {"cuBLAS workspaces (forward + autograd threads)": 2 * cublas_workspace_bytes()}
        dev = (head_dev if pr.head_grad >= sum(block_dev.values()) else block_dev) | ws
    stages = {"head": sum(head_stage.values()), "reverse walk": sum(walk_stage.values())}
    if ram and scratch:
        stages["forward"] = sum(forward_stage.values())
    named = {"head": head_stage, "reverse walk": walk_stage, "forward": forward_stage}
    host = named[max(stages, key=stages.get)]
    disk = {f"gradient files ({'fp32' if grad_file == acc_block else 'bf16'}, all blocks)": L * grad_file,
            # the incoming gradient persisted after each block for resume, replaced atomically (two copies)
            "persisted incoming gradient (old + new while replaced)": 2 * persisted} if s.writer else {}
    if not ram:
        disk |= {f"boundaries {max(held_head, held_walk)} x [N,T,D]": max(held_head, held_walk) * stored,
                 "two gradient buffers": 2 * boundary} | scratch
    p = PhasePlan("gradient_sweep", sum(dev.values()), max(stages.values()), sum(disk.values()),
                  {"device": dev, "host": host, "disk": disk})
    p.terms["device_steps"] = {"block": sum(block_dev.values()), "head": pr.head_grad}
    p.terms["host_stages"] = stages
    return p
