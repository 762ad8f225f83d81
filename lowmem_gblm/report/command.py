"""``lowmem-gblm report OUT_DIR [--png DIR] [--compare OTHER_OUT_DIR]``: the text summary and the figures."""

from __future__ import annotations

from pathlib import Path

from lowmem_gblm.errors import UsageError
from lowmem_gblm.report import require_matplotlib
from lowmem_gblm.report.summary import check_comparable, choose_linears, compare_lines, load_run, summary_lines


def check_png_folder(folder: Path) -> None:
    """Refuse a ``--png`` path that cannot be a folder: an existing file, or a path under a file."""
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                what = "is" if path == folder else f"is under {path}, which is"
                raise UsageError(f"--png {folder} {what} a file, not a folder; name a folder for the figures")
            return


def report(out_dir: str | Path, png: str | Path | None = None, compare: str | Path | None = None,
           block: int | None = None, linears: str | None = None) -> tuple[list[str], list[Path]]:
    """(lines to print, PNG files written). Everything is checked before anything is written: matplotlib (for
    ``png``), both reports, that both runs are of one model, the chosen linears."""
    if png is not None:
        require_matplotlib()
        check_png_folder(Path(png))
    runs = [load_run(out_dir)]
    if compare is not None:
        runs.append(load_run(compare))
        check_comparable(runs[0], runs[1])
    names = choose_linears(runs[0], block, linears) if png is not None else []
    if len(runs) == 2:
        missing = [n for n in names if n not in runs[1].per_linear]
        if missing:
            raise UsageError(f"--compare: {runs[1].out} did not prune {missing[0]}; choose linears both runs pruned "
                             "(--block / --linears)")
    lines = summary_lines(runs[0])
    if len(runs) == 2:
        lines += ["", *summary_lines(runs[1]), "", *compare_lines(runs[0], runs[1])]
    written: list[Path] = []
    if png is not None:
        from lowmem_gblm.report import figures

        folder = Path(png)
        try:
            written.append(figures.output_error_figure(runs, folder / "output_error.png"))
            share = figures.gradient_share_figure(runs, folder / "gradient_share.png")
            if share is not None:
                written.append(share)
            written.append(figures.mask_figure(runs, names, folder / "masks.png"))
        except OSError as exc:  # a folder we may not write, a full disk
            raise UsageError(f"--png {folder}: cannot write the figures ({exc})") from exc
    return lines, written
