"""PNG figures of ``lowmem-gblm report`` (matplotlib, the optional ``report`` extra).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no global backend switch,
nothing shown on a screen. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lowmem_gblm.report import require_matplotlib
from lowmem_gblm.report.summary import CORNER, GRID_CELLS, RunSummary, keep_grid, per_kind, read_keep, stored_name

log = logging.getLogger(__name__)

DPI = 110
COLORS = ("tab:blue", "tab:orange")  # run A, run B
MAX_COLUMNS = 4  # mask panels per row of the figure, when a linear needs fewer


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    log.info("wrote %s", path)
    return path


def output_error_figure(runs: list[RunSummary], path: Path) -> Path:
    """Per block: the relative output error (top) and the measured sparsity (bottom), one line per run."""
    fig = _figure(8, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for run, color in zip(runs, COLORS, strict=False):
        blocks = list(range(run.num_blocks))
        label = f"{run.label} ({run.method})"
        known = [(i, e) for i, e in zip(blocks, run.output_error, strict=True) if e is not None]
        if known:
            top.plot([i for i, _ in known], [e for _, e in known], "o-", color=color, label=label)
        bottom.plot(blocks, run.per_block_sparsity, "s-", color=color, label=label)
    top.set_ylabel("relative output error\n‖Y_pruned − Y_dense‖ / ‖Y_dense‖")
    top.set_title("Per-block output error on the calibration windows")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    bottom.set_ylabel("sparsity (fraction of zeros)")
    bottom.set_xlabel("decoder block")
    bottom.set_title("Per-block sparsity of the pruned linears")
    bottom.set_ylim(0, 1)
    bottom.grid(alpha=0.3)
    n = max(r.num_blocks for r in runs)
    bottom.set_xticks(range(n) if n <= 40 else range(0, n, max(1, n // 20)))
    for ax in (top, bottom):
        ax.legend(loc="best", fontsize="small")
    if not any(e is not None for r in runs for e in r.output_error):
        top.text(0.5, 0.5, "output error not recorded in these reports", ha="center", va="center",
                 transform=top.transAxes)
    return _save(fig, path)


def gradient_share_figure(runs: list[RunSummary], path: Path) -> Path | None:
    """GBLM, per linear kind: the gradient term's share of the score (top) and the fraction of keep decisions
    flipped against Wanda (bottom); bars are the mean over the kind's linears (blocks, experts), whiskers the min
    and max. None (nothing written) when no run holds those numbers (not GBLM)."""
    gblm = [r for r in runs if per_kind(r, "gradient_share")]
    if not gblm:
        log.info("no GBLM run: no gradient-share figure")
        return None
    kinds = sorted({k for r in gblm for k in per_kind(r, "gradient_share")})
    fig = _figure(max(7.0, 0.9 * len(kinds) + 3), 7)
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(gblm)
    for j, run in enumerate(gblm):
        color = COLORS[runs.index(run) % len(COLORS)]
        for ax, key in zip(axes, ("gradient_share", "flipped_vs_wanda"), strict=True):
            stats = per_kind(run, key)
            xs = [k + (j - (len(gblm) - 1) / 2) * width for k, kind in enumerate(kinds) if kind in stats]
            means = [stats[kind]["mean"] for kind in kinds if kind in stats]
            lo = [stats[kind]["mean"] - stats[kind]["min"] for kind in kinds if kind in stats]
            hi = [stats[kind]["max"] - stats[kind]["mean"] for kind in kinds if kind in stats]
            ax.bar(xs, means, width=width, color=color, yerr=[lo, hi], capsize=3,
                   label=f"{run.label} ({run.method})")
    axes[0].set_ylabel("gradient share of the score\nΣ α|W|G / Σ (|W|√s + α|W|G)")
    axes[0].set_title("GBLM: share of the gradient term per linear kind (mean over its linears, min–max)")
    axes[1].set_ylabel("fraction of keep decisions\nflipped vs Wanda")
    axes[1].set_title("GBLM: keep decisions that differ from Wanda's (same Σx², same pattern)")
    axes[1].set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    axes[1].set_xlabel("linear kind")
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def mask_figure(runs: list[RunSummary], names: list[str], path: Path) -> Path:
    """Per linear a group of panels, runs side by side: the whole matrix as the kept fraction of each cell (block
    averages into at most GRID_CELLS x GRID_CELLS cells) and, when some matrix is larger than that, its top-left
    CORNER x CORNER weights at full resolution (where N:M groups and single weights show). With two runs, a last
    panel shows where their keep decisions differ. Narrow groups are laid out several to a row. Zeros in the
    written weights are shown as pruned (the masks themselves are not stored)."""
    keeps = {(name, run.out): read_keep(run.out, name, stored_name(run, name)) for name in names for run in runs}
    corners = any(max(k.shape) > GRID_CELLS for k in keeps.values())
    per_run = 2 if corners else 1
    group = per_run * len(runs) + (len(runs) == 2)  # panels per linear
    across = max(1, MAX_COLUMNS // group)  # linears per row of the figure
    rows = -(-len(names) // across)
    cols = group * min(across, len(names))
    fig = _figure(max(3.4 * cols + 1.4, 8.0), 2.9 * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names) * group:]:
        ax.set_axis_off()  # the last row's unused places
    kept_axes, diff_axes = [], []
    kept_image = diff_image = None
    for k, name in enumerate(names):
        row, first = divmod(k, across)
        panels = axes[row][first * group:(first + 1) * group]
        for j, run in enumerate(runs):
            keep = keeps[(name, run.out)]
            ax = panels[per_run * j]
            kept_image = _heat(ax, keep_grid(keep), tuple(keep.shape), "gray")
            ax.set_title(f"{run.label}: {_short(name)}\n[{keep.shape[0]} x {keep.shape[1]}], kept "
                         f"{float(keep.float().mean()):.3f}", fontsize="small")
            kept_axes.append(ax)
            if corners:
                c = keep[:CORNER, :CORNER]
                _heat(panels[per_run * j + 1], c.float(), tuple(c.shape), "gray")
                panels[per_run * j + 1].set_title(f"{run.label}: top-left {c.shape[0]} x {c.shape[1]}\n"
                                                  "(every weight)", fontsize="small")
                kept_axes.append(panels[per_run * j + 1])
        if len(runs) == 2:
            a, b = (keeps[(name, run.out)] for run in runs)
            ax = panels[-1]
            diff_image = _heat(ax, keep_grid(a ^ b), tuple(a.shape), "magma")
            differ = float((a ^ b).float().mean())
            ax.set_title(f"{runs[0].label} vs {runs[1].label}: {_short(name)}\ndiffer in {differ:.3f}",
                         fontsize="small")
            diff_axes.append(ax)
    fig.suptitle("Keep masks: white kept, black pruned (whole-matrix panels: kept fraction per cell)")
    fig.colorbar(kept_image, ax=kept_axes, shrink=0.5, label="kept fraction")
    if diff_image is not None:
        fig.colorbar(diff_image, ax=diff_axes, shrink=0.5, label="fraction of keep decisions that differ")
    return _save(fig, path)


def _heat(ax, values, shape: tuple[int, int], cmap: str):
    """A [rows, cols] grid in [0, 1] drawn over the matrix's own row and column numbers."""
    rows, columns = shape
    image = ax.imshow(values.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                      extent=(0, columns, rows, 0))
    ax.set_xlabel("input column")
    ax.set_ylabel("output row")
    return image


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight")
