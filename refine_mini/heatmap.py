"""Needle-in-a-haystack results as pictures: a terminal heatmap, a side-by-side summary table, an optional PNG.

Question answered: how do we *see* where a fast-weight memory loses the needle (method.md §6, RULER NIAH)?

The heatmap is the usual NIAH picture: rows = context length (tokens), columns = needle depth (0 = the needle opens
the haystack, after at most one sentence fragment; 1 = right before the question), cells = recall in percent
(rounded). On a terminal that supports it (stdout is a TTY, no --no-color, no NO_COLOR variable,
https://no-color.org) each cell gets an ANSI 256-colour background on a red -> yellow -> green ramp; otherwise the
same grid is plain text, which is also what the tests assert on. The PNG needs matplotlib, which is not a project
dependency: `require_matplotlib()` says how to install it in one line.

Plain rendering of a 2 x 3 grid (what `render_heatmap(..., color=False)` returns):

    run-a  s_niah  recall % (rows: context length, cols: needle depth)
      length |    0%   50%  100% |   avg
      -------+-------------------+------
         256 |   100    50     0 |    50
         512 |    25     -    75 |    50

A cell with no score (not evaluated) prints "-" and is left out of the row average.
"""

import math
import os
import sys

# Red (0 %) -> yellow (50 %) -> green (100 %) in the xterm 256-colour cube; 11 steps of 10 %.
RAMP = (196, 202, 208, 214, 220, 226, 190, 154, 118, 82, 46)
CELL = 6  # characters per heatmap cell


def use_color(no_color_flag: bool = False, stream=None) -> bool:
    """ANSI colours only for a real terminal, and never with --no-color or the NO_COLOR environment variable."""
    stream = sys.stdout if stream is None else stream
    if no_color_flag or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _paint(text: str, score: float | None, color: bool) -> str:
    if not color or score is None:
        return text
    code = RAMP[min(len(RAMP) - 1, max(0, round(score * 10)))]
    return f"\x1b[48;5;{code}m\x1b[38;5;16m{text}\x1b[0m"  # background colour, black text, reset


def _pct(score: float | None) -> str:
    # half up (12.5 -> 13), not Python's half to even; rounded to 6 places first, so a binary 0.575 (23/40) gives 58
    return "-" if score is None else str(math.floor(round(100 * score, 6) + 0.5))


def render_heatmap(scores: dict, lengths: list[int], depths: list[float], title: str = "",
                   color: bool = False) -> str:
    """scores {(length, depth): recall in [0, 1]} -> a multi-line string (no trailing newline)."""
    header = "  length |" + "".join(f"{_pct(d)}%".rjust(CELL) for d in depths) + " |   avg"
    lines = [title] if title else []
    lines += [header, "  " + "-" * 7 + "+" + "-" * (CELL * len(depths) + 1) + "+" + "-" * 6]
    for length in lengths:
        row = [scores.get((length, d)) for d in depths]
        cells = "".join(_paint(_pct(s).rjust(CELL), s, color) for s in row)
        known = [s for s in row if s is not None]
        avg = sum(known) / len(known) if known else None
        lines.append(f"  {length:>6} |{cells} |{_pct(avg).rjust(CELL)}")
    return "\n".join(lines)


def render_table(rows: list[str], columns: list[str], cells: dict, corner: str = "task") -> str:
    """A plain table of recall %: cells {(row, column): score in [0, 1] or None}; columns are the runs."""
    width0 = max([len(corner)] + [len(r) for r in rows])
    widths = [max(6, len(c)) for c in columns]
    out = [corner.ljust(width0) + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths)),
           "-" * width0 + "  " + "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(r.ljust(width0) + "  " + "  ".join(_pct(cells.get((r, c))).rjust(w)
                                                      for c, w in zip(columns, widths)))
    return "\n".join(out)


def require_matplotlib():
    """Import matplotlib (headless backend) or raise ImportError with the one-line install hint."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is optional: pip install matplotlib") from None
    return plt


def save_png(path: str, panels: list[list[tuple[str, dict]]], lengths: list[int], depths: list[float]) -> None:
    """A grid of heatmaps (panels[i][j] = (title, scores): one row per run, one column per task) saved as a PNG."""
    plt = require_matplotlib()
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, layout="constrained",
                             figsize=(1.5 + 0.7 * len(depths) * n_cols, (1.0 + 0.4 * len(lengths)) * n_rows))
    image = None
    for i, row in enumerate(panels):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            title, scores = row[j]
            grid = [[100 * scores[(n, d)] if (n, d) in scores else float("nan") for d in depths] for n in lengths]
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_title(title, fontsize=9)
            if i == n_rows - 1:
                ax.set_xlabel("needle depth")
            if j == 0:
                ax.set_ylabel("context length")
            for r, values in enumerate(grid):
                for c, value in enumerate(values):
                    if value == value:  # not NaN
                        ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="recall %")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
