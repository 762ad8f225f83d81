"""In-memory references written independently of the streaming engine: the whole tiny model is
loaded with transformers and pruned block by block as the published Wanda code does."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM


def int8_error_bound(absmax: torch.Tensor) -> torch.Tensor:
    """Per-block bound on |x - dequant(quant(x))| of the int8 store: absmax times the largest distance from a point
    of [-1, 1] to the map (half its widest gap, or an end: the map's lowest value is -0.993, not -1)."""
    from lowmem_gblm.stream.store import int8_code

    code = int8_code().sort().values
    worst = max(float((code[1:] - code[:-1]).max()) / 2, float(code[0]) + 1, 1 - float(code[-1]))
    return absmax.to(torch.float32) * worst


def load_ids(out_dir) -> torch.Tensor:
    with safe_open(str(out_dir / "calibration_ids.safetensors"), framework="pt") as f:
        return f.get_tensor("input_ids")


def load_full(model_dir) -> torch.nn.Module:
    """fp32; fused experts (mixtures of experts) run transformers' eager per-expert loop."""
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                experts_implementation="eager").eval()


def _experts(layer):
    """The fused experts module of a mixture-of-experts block (transformers 5), else None."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    return experts if experts is not None and hasattr(experts, "gate_up_proj") else None


def _row_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(score.shape[1] * sparsity)
    idx = torch.argsort(score, dim=1, stable=True)[:, :k]
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, idx, False)
    return keep


def _nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.ones_like(score, dtype=torch.bool)
    for start in range(0, score.shape[1], m):
        group = score[:, start:start + m]
        idx = torch.argsort(group, dim=1, stable=True)[:, : m - n]
        keep[:, start:start + m].scatter_(1, idx, False)
    return keep


def keep_from_score(score: torch.Tensor, pattern: str, sparsity: float | None) -> torch.Tensor:
    if pattern == "unstructured":
        return _row_keep(score, sparsity)
    n, m = (int(v) for v in pattern.split(":"))
    return _nm_keep(score, n, m)


@torch.no_grad()
def inmemory_prune(model_dir, ids: torch.Tensor, method: str, pattern: str = "unstructured",
                   sparsity: float | None = 0.5, grads: dict | None = None, alpha: float = 0.0,
                   blocksize: int = 128, percdamp: float = 0.01, update: str = "none", prunes=None,
                   solver: str = "auto", solver_tol: float = 3e-2, ridge: float | None = None):
    """Prune the whole in-memory model: for each block, collect sum x^2 per linear input with hooks while
    the full model runs every window (earlier blocks already pruned), score, mask, go on. ``prunes``: which
    linears (by full module name) are pruned; None: all. ``ridge``: lsq / gradual solve with percdamp + ridge
    (None: the prune command's default for them)."""
    from lowmem_gblm.config import default_ridge
    from lowmem_gblm.methods import MethodOptions
    from lowmem_gblm.methods.update import update_damping

    kind = "unstructured" if pattern == "unstructured" else "nm"
    ridge, scaling = default_ridge(update, kind) if ridge is None else (ridge, "none")
    solve_options = MethodOptions(alpha=alpha, percdamp=percdamp, solver_tol=solver_tol, ridge=ridge,
                                  ridge_scaling=scaling, calib_tokens=ids.numel())
    model = load_full(model_dir)
    layers = model.model.layers
    per_layer = sparsity if isinstance(sparsity, list) else None  # OWL: one sparsity per block
    for i, layer in enumerate(layers):
        if per_layer is not None:
            sparsity = per_layer[i]
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                   and (prunes is None or prunes(f"model.layers.{i}.{n}"))}  # --targets / --ignore
        sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        xtx = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        hooks = []
        for n, m in linears.items():
            def hook(_m, args, _n=n, _sums=sums, _xtx=xtx):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                _sums[_n] += (x * x).sum(0)
                _xtx[_n] += x.t() @ x
            hooks.append(m.register_forward_pre_hook(hook))
        experts, routed = _experts(layer), {}
        if experts is not None:  # the tokens the router sends to each expert, in the expert loop's order
            def moe_hook(_m, args, _routed=routed):
                hidden, top_k_index = args[0], args[1]
                for e in range(_m.num_experts):
                    _pos, tok = torch.where(top_k_index.t() == e)
                    _routed.setdefault(e, []).append(hidden[tok])
            hooks.append(experts.register_forward_pre_hook(moe_hook))
        for k in range(ids.shape[0]):
            model.model(ids[k:k + 1])
        for h in hooks:
            h.remove()
        if experts is not None:
            _prune_experts(experts, routed, i, ids.shape[0], method, pattern, sparsity, grads, alpha)
        for n, m in linears.items():
            w = m.weight
            if method == "sparsegpt":
                from lowmem_gblm.mask import Pattern
                from lowmem_gblm.methods.sparsegpt import sparsegpt_prune

                hessian = xtx[n] * (2.0 / ids.shape[0])
                new, _keep = sparsegpt_prune(w, hessian, Pattern.parse(pattern, sparsity), blocksize, percdamp)
                w.copy_(new)
                continue
            if method == "magnitude":
                score = w.abs()
            else:
                score = w.abs() * torch.sqrt(sums[n] / ids.shape[0]).reshape(1, -1)
                if method == "gblm":
                    score = score + alpha * (w.abs() * grads[f"model.layers.{i}.{n}.weight"])
            keep = keep_from_score(score, pattern, sparsity)
            if update == "gradual":  # chooses its own mask: the package's function on the in-memory statistics
                from lowmem_gblm.mask import Pattern
                from lowmem_gblm.methods import LinearJob, get_method

                stats = {"scaler_row": sums[n] / ids.shape[0], "hessian": xtx[n] * (2.0 / ids.shape[0])}
                if method == "gblm":
                    stats["gradient"] = grads[f"model.layers.{i}.{n}.weight"]
                job = LinearJob(n, w, stats, Pattern.parse(pattern, sparsity), solve_options)
                get_method(f"{method}+gradual").prune(job)
                continue
            if update != "none":  # the kept weights rewritten for this mask (the package's update math, tested alone)
                from lowmem_gblm.methods.solve import factor_hessian, solve_kept
                from lowmem_gblm.methods.update import lsq_update, obs_update, resolve_solver

                hessian = xtx[n] * (2.0 / ids.shape[0])
                if update == "obs":
                    new = obs_update(w, hessian, keep, blocksize, percdamp)
                elif resolve_solver(solver, w.shape[1]) == "direct":
                    new = lsq_update(w, hessian, keep, update_damping(solve_options, w.shape[1]))
                else:
                    damping = update_damping(solve_options, w.shape[1])
                    new = solve_kept(w, factor_hessian(hessian, damping), keep, solver_tol).weight
                w.copy_(new)
            w.masked_fill_(~keep, 0)
    return model


def full_model(model_dir) -> torch.nn.Module:
    """The whole model in fp32 with SDPA attention (what the streamed blocks use)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa",
                                                 experts_implementation="eager")
    return model.eval()


def _block_weights(model) -> dict[str, torch.Tensor]:
    """name -> weight for every linear inside the decoder blocks (checkpoint names) and every fused expert
    parameter (module names, [E, out, in])."""
    out = {f"{name}.weight": m.weight for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and ".layers." in name}
    out.update({name: p for name, p in model.named_parameters()
                if ".layers." in name and ".experts." in name and p.dim() == 3})
    return out


_REF_CACHE: dict[str, tuple[dict, dict, float]] = {}


def reference_gradients(model_dir, ids: torch.Tensor) -> tuple[dict, dict, float]:
    """Full-model per-sample autograd: (l1 = sum|g|, l2 = sqrt(sum g^2), mean loss), by _block_weights' names."""
    key = f"{model_dir}|{hash(ids.numpy().tobytes())}"
    if key not in _REF_CACHE:
        model = full_model(model_dir)
        weights = _block_weights(model)
        l1 = {k: torch.zeros_like(w) for k, w in weights.items()}
        sq = {k: torch.zeros_like(w) for k, w in weights.items()}
        losses = []
        for n in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            loss = model(ids[n:n + 1], labels=ids[n:n + 1]).loss
            loss.backward()
            losses.append(float(loss.detach()))
            for k, w in weights.items():
                g = w.grad.float()
                l1[k] += g.abs()
                sq[k] += g * g
        _REF_CACHE[key] = (l1, {k: v.sqrt() for k, v in sq.items()}, sum(losses) / len(losses))
    return _REF_CACHE[key]


def _prune_experts(experts, routed: dict, i: int, nsamples: int, method: str, pattern: str, sparsity, grads,
                   alpha: float) -> None:
    """Wanda / GBLM / magnitude on each expert's gate rows, up rows and down matrix, with the tokens routed to
    it (an expert with none: magnitude); every score from the dense block, then the masks."""
    inter = experts.down_proj.shape[-1]
    masks = []
    for e in range(experts.num_experts):
        x = torch.cat(routed[e]) if routed.get(e) else torch.zeros(0, experts.gate_up_proj.shape[-1])
        gate_up = experts.gate_up_proj.data[e]
        gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up  # the down matrix's input
        sq_in, sq_h = (x.float() ** 2).sum(0), (h.float() ** 2).sum(0)
        for w, sq, key in ((gate_up[:inter], sq_in, ("gate_up_proj", e, slice(0, inter))),
                           (gate_up[inter:], sq_in, ("gate_up_proj", e, slice(inter, None))),
                           (experts.down_proj.data[e], sq_h, ("down_proj", e, slice(None)))):
            if method == "magnitude" or x.shape[0] == 0:
                score = w.abs()
            else:
                score = w.abs() * torch.sqrt(sq / nsamples).reshape(1, -1)
                if method == "gblm":
                    param, _e, rows = key
                    score = score + alpha * (w.abs() * grads[f"model.layers.{i}.mlp.experts.{param}"][e, rows])
            masks.append((w, keep_from_score(score, pattern, sparsity)))
    for w, keep in masks:
        w.masked_fill_(~keep, 0)
