"""The numbers of ``lowmem-gblm report``, as small pure functions over a run's ``prune_report.json`` and shards.

A run's report holds, per block, the measured sparsity (``sparsity.per_block``) and the relative output error
of the pruned block on its calibration inputs (``diagnostics.output_error``; null when not recorded), and per
GBLM linear the gradient term's share of the score and the fraction of keep decisions flipped against Wanda
(``sparsity.per_linear``); ``diagnostics.definitions`` says how each is computed. Reports written before these
diagnostics existed still summarize (their missing numbers show as "-").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lowmem_gblm.errors import InputError, UsageError
from lowmem_gblm.io.checkpoint import INDEX_NAME, read_tensors, read_weight_map
from lowmem_gblm.io.layout import FAMILIES, Family
from lowmem_gblm.io.runstate import REPORT_NAME
from lowmem_gblm.userregex import compile_user_regex

GRID_CELLS = 256  # a mask heatmap has at most this many cells along each side
CORNER = 64  # the full-resolution corner shown beside it (rows x columns), where N:M groups are visible
MAX_LINEARS = 8  # linears per mask figure
DIAGNOSTICS = ("gradient_share", "flipped_vs_wanda")  # per-linear numbers (GBLM)
_BLOCK = re.compile(r"\.(\d+)\.")  # the first ".<index>." of a weight name is its decoder block


@dataclass(frozen=True)
class RunSummary:
    """What ``report`` needs of one finished run."""

    out: Path
    method: str
    pattern: str
    overall: float
    per_block_sparsity: list[float]
    output_error: list[float | None]  # per block, None: not recorded
    per_linear: dict[str, dict]  # full weight name -> {"shape", "zeros", "sparsity", [gradient_share, ...]}
    model: dict  # diagnostics.model (StreamedModel.identity), or {} for a report without it

    @property
    def label(self) -> str:
        return self.out.name or str(self.out)

    @property
    def num_blocks(self) -> int:
        return len(self.per_block_sparsity)


def load_run(out_dir: str | Path) -> RunSummary:
    """A finished run's summary, or an InputError naming what is missing or damaged."""
    out = Path(out_dir)
    path = out / REPORT_NAME
    if not path.is_file():
        raise InputError(f"{out} holds no {REPORT_NAME}: not a finished lowmem-gblm prune run (finish it by running "
                         "the same prune command again)")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
        sparsity = doc["sparsity"]
        per_linear, per_block = sparsity["per_linear"], [float(x) for x in sparsity["per_block"]]
        if not isinstance(per_linear, dict) or not all(isinstance(r, dict) and "shape" in r
                                                       for r in per_linear.values()):
            raise ValueError("sparsity.per_linear is not an object of per-linear rows")
        diag = doc.get("diagnostics") or {}
        errors = diag.get("output_error") or [None] * len(per_block)
        if len(errors) != len(per_block):
            raise ValueError(f"{len(errors)} output errors for {len(per_block)} blocks")
        errors = [None if e is None else float(e) for e in errors]
        summary = RunSummary(out, str(doc["method"]), str(doc.get("pattern", "?")), float(sparsity["overall"]),
                             per_block, errors, per_linear, dict(diag.get("model") or {}))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, ValueError,
            AttributeError) as exc:
        raise InputError(f"{path} is damaged or not a lowmem-gblm report ({type(exc).__name__}: {exc})") from exc
    return summary


def block_of(name: str) -> int | None:
    """The decoder block index of a weight name (``model.layers.3.mlp.down_proj.weight`` -> 3), or None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def linear_kind(name: str) -> str:
    """A linear's name inside its block, expert indices as ``*``: ``model.layers.3.mlp.experts.5.w2.weight`` ->
    ``mlp.experts.*.w2``."""
    m = _BLOCK.search(name)
    inner = name[m.end():] if m else name
    return re.sub(r"(^|\.)\d+(?=\.)", r"\1*", inner.removesuffix(".weight"))


def per_block_rows(run: RunSummary) -> list[dict]:
    """Per block: sparsity, output error, and the mean of each per-linear diagnostic over the block's linears that
    have it (None where none has)."""
    rows = [{"block": i, "sparsity": s, "output_error": e} for i, (s, e) in
            enumerate(zip(run.per_block_sparsity, run.output_error, strict=True))]
    for key in DIAGNOSTICS:
        values: dict[int, list[float]] = {}
        for name, r in run.per_linear.items():
            i = block_of(name)
            if key in r and i is not None and i < len(rows):
                values.setdefault(i, []).append(float(r[key]))
        for row in rows:
            v = values.get(row["block"])
            row[key] = sum(v) / len(v) if v else None
    return rows


def per_kind(run: RunSummary, key: str) -> dict[str, dict]:
    """Per linear kind (``linear_kind``), ``key``'s mean / min / max over the linears of that kind (one per block, or
    one per block and expert), and its values in block order; kinds without the value are left out (e.g. every kind
    for a non-GBLM run)."""
    groups: dict[str, list[tuple[int, float]]] = {}
    for name, r in run.per_linear.items():
        if key in r:
            groups.setdefault(linear_kind(name), []).append((block_of(name) or 0, float(r[key])))
    out = {}
    for kind, pairs in groups.items():
        values = [v for _, v in sorted(pairs)]
        out[kind] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}
    return out


def model_mismatch(a: RunSummary, b: RunSummary) -> str | None:
    """Why two runs are not of the same model, or None. Same model: the same architecture, config.json bytes and
    tensor layout (names, dtypes, shapes) as recorded in their reports, and the same pruned-linear shapes. Weight
    values are not compared (two checkpoints of identical config and layout are told apart only by their folder
    and file times, which differ for a copy of one model too: those are not refused)."""
    for key, what in (("architecture", "architecture"), ("config_sha256", "config.json"),
                      ("layout_sha256", "tensor names, dtypes and shapes")):
        va, vb = a.model.get(key), b.model.get(key)
        if va is not None and vb is not None and va != vb:
            return f"their models' {what} differ ({a.model.get('dir', '?')} vs {b.model.get('dir', '?')})"
    shapes_a = {linear_kind(n) + f"@{block_of(n)}": tuple(r["shape"]) for n, r in a.per_linear.items()}
    shapes_b = {linear_kind(n) + f"@{block_of(n)}": tuple(r["shape"]) for n, r in b.per_linear.items()}
    common = set(shapes_a) & set(shapes_b)
    if a.num_blocks != b.num_blocks or not common or any(shapes_a[k] != shapes_b[k] for k in common):
        return (f"their models differ in shape ({a.num_blocks} vs {b.num_blocks} blocks, or linears of other shapes)")
    return None


def check_comparable(a: RunSummary, b: RunSummary) -> None:
    problem = model_mismatch(a, b)
    if problem:
        raise UsageError(f"--compare: {a.out} and {b.out} were pruned from different models: {problem}; compare runs "
                         "of one model")


def choose_linears(run: RunSummary, block: int | None, pattern: str | None) -> list[str]:
    """The linears a mask figure shows: those matching ``pattern`` (``re.search`` on the full weight name) or,
    without one, every pruned linear of ``block`` (default: the middle block); at most MAX_LINEARS, in name
    order."""
    if pattern is not None:
        rx = compile_user_regex("--linears", pattern)
        names = [n for n in run.per_linear if rx.search(n)]
        if not names:
            raise UsageError(f"--linears {pattern!r} matches no pruned linear of {run.out} (names look like "
                             f"{next(iter(run.per_linear), '?')})")
    else:
        i = run.num_blocks // 2 if block is None else block
        if not 0 <= i < run.num_blocks:
            raise UsageError(f"--block {block}: {run.out} has blocks 0..{run.num_blocks - 1}")
        names = [n for n in run.per_linear if block_of(n) == i]
        if not names:
            raise UsageError(f"--block {i}: no linear of that block was pruned in {run.out}; choose another --block")
    return sorted(names)[:MAX_LINEARS]


def run_family(run: RunSummary) -> Family | None:
    """The family row of the run's model: its report's ``diagnostics.model.architecture``, else the
    ``architectures`` of OUT_DIR's config.json; None when neither names a family we know."""
    name = run.model.get("architecture")
    if name is not None:
        return next((f for f in FAMILIES if f.name == name), None)
    try:
        archs = json.loads((run.out / "config.json").read_bytes().decode("utf-8")).get("architectures") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError):
        return None
    return next((f for f in FAMILIES if any(a in f.architectures for a in archs if isinstance(a, str))), None)


def stored_name(run: RunSummary, name: str) -> str:
    """A linear's name in the run's index: the report names linears as transformers' modules do, the checkpoint
    stores vision layers under transformers 4's names (io.layout, the same mapping verify uses)."""
    family = run_family(run)
    return name if family is None else family.to_stored(name)


def read_keep(out_dir: Path, name: str, stored: str | None = None) -> torch.Tensor:
    """keep [out, in] bool of a written linear ``name`` (``stored``: its name in the index, when it differs). The
    masks themselves are not stored, so a kept weight that is exactly 0 (in the source checkpoint, or after a weight
    update) shows as pruned."""
    index = out_dir / INDEX_NAME
    if not index.is_file():
        raise InputError(f"{out_dir} has no {INDEX_NAME}: not a finished run")
    key = stored or name
    shard = read_weight_map(index).get(key)
    if shard is None or Path(shard).name != shard or not (out_dir / shard).is_file():
        shown = name if key == name else f"{name} (stored as {key})"
        raise InputError(f"{out_dir}: {shown} is not in its index or its shard {shard!r} is missing")
    weight = read_tensors(out_dir / shard, [key])[key]
    if weight.dim() != 2:
        raise InputError(f"{out_dir}: {name} has shape {list(weight.shape)}, not a matrix")
    return weight != 0


def keep_grid(keep: torch.Tensor, cells: int = GRID_CELLS) -> torch.Tensor:
    """keep [out, in] bool -> [min(out, cells), min(in, cells)] fp32: the kept fraction of each cell (block averages;
    with sizes that do not divide, adjacent cells share a row or column, as adaptive average pooling does)."""
    rows, cols = min(keep.shape[0], cells), min(keep.shape[1], cells)
    return F.adaptive_avg_pool2d(keep.to(torch.float32)[None, None], (rows, cols))[0, 0]


def _fmt(v: float | None, width: int = 8) -> str:
    if v is None:
        return "-".rjust(width)
    return ("inf" if math.isinf(v) else f"{v:.4f}").rjust(width)


def summary_lines(run: RunSummary) -> list[str]:
    """The text summary of one run: header, per-block table, per-linear-kind table (GBLM)."""
    model = run.model.get("dir", "?")
    lines = [f"{run.out}: {run.method}, pattern {run.pattern}, overall sparsity {run.overall:.4f}, "
             f"{run.num_blocks} blocks, model {model}"]
    rows = per_block_rows(run)
    gblm = any(r["gradient_share"] is not None for r in rows)
    head = f"{'block':>5} {'sparsity':>8} {'out_err':>8}" + (f" {'grad_shr':>8} {'flipped':>8}" if gblm else "")
    lines.append(head)
    for r in rows:
        line = f"{r['block']:>5} {_fmt(r['sparsity'])} {_fmt(r['output_error'])}"
        if gblm:
            line += f" {_fmt(r['gradient_share'])} {_fmt(r['flipped_vs_wanda'])}"
        lines.append(line)
    errors = [e for e in run.output_error if e is not None]
    if errors:
        unknown = run.num_blocks - len(errors)
        lines.append(f"output error (||Y_pruned - Y_dense|| / ||Y_dense|| per block): mean "
                     f"{sum(errors) / len(errors):.4f}, max {max(errors):.4f}"
                     + (f" ({unknown} block(s) not recorded)" if unknown else ""))
    else:
        lines.append("output error: not recorded in this report")
    if gblm:
        shares, flips = per_kind(run, "gradient_share"), per_kind(run, "flipped_vs_wanda")
        width = max(len(k) for k in shares)
        lines.append(f"{'linear kind':<{width}}  {'gradient share mean [min, max]':<32}  "
                     "flipped vs Wanda mean [min, max]")
        for kind in sorted(shares):
            s, f = shares[kind], flips.get(kind)
            share = f"{s['mean']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"
            flipped = f"{f['mean']:.4f} [{f['min']:.4f}, {f['max']:.4f}]" if f else "-"
            lines.append(f"{kind:<{width}}  {share:<32}  {flipped}")
    return lines


def compare_lines(a: RunSummary, b: RunSummary) -> list[str]:
    """Both runs' per-block sparsity and output error side by side, and the ratio of B's error to A's."""
    lines = [f"A = {a.out} ({a.method}, {a.pattern}, sparsity {a.overall:.4f})",
             f"B = {b.out} ({b.method}, {b.pattern}, sparsity {b.overall:.4f})",
             f"{'block':>5} {'A spars':>8} {'A err':>8} {'B spars':>8} {'B err':>8} {'B/A err':>8}"]
    for i in range(a.num_blocks):
        ea, eb = a.output_error[i], b.output_error[i]
        ratio = eb / ea if ea and eb is not None else None
        lines.append(f"{i:>5} {_fmt(a.per_block_sparsity[i])} {_fmt(ea)} {_fmt(b.per_block_sparsity[i])} "
                     f"{_fmt(eb)} {_fmt(ratio)}")
    both = [(x, y) for x, y in zip(a.output_error, b.output_error, strict=True) if x is not None and y is not None]
    if both:
        lower = sum(y < x for x, y in both)
        mean_a, mean_b = (sum(p[k] for p in both) / len(both) for k in (0, 1))
        lines.append(f"B's output error is lower in {lower} of {len(both)} blocks; mean A {mean_a:.4f}, "
                     f"mean B {mean_b:.4f}")
    return lines
