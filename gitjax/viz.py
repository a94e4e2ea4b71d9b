"""Host-side visualisation: image grids, curve plots and text tables.

Everything here is numpy / PIL / matplotlib and runs on the host. Plots are
drawn on an explicit Agg canvas (``FigureCanvasAgg``) rather than through
pyplot, so the module works headless and never changes the global matplotlib
backend of an interactive session that imports it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

__all__ = ["image_grid", "save_grid", "save_curve_plot", "format_table"]

_BACKGROUND = 255  # white padding / label area
_TEXT_COLOUR = (0, 0, 0)
_LABEL_MARGIN = 4  # pixels either side of a row label


# ---------------------------------------------------------------------------
# image grids
# ---------------------------------------------------------------------------


def _to_rgb_uint8(images_BxHxWxC: Any) -> np.ndarray:
    """Float images in [0, 1] -> uint8 RGB, shape (B, H, W, 3).

    NaN/inf (diverged reconstructions) become 0/1 instead of garbage.
    """
    x_BxHxWxC = np.asarray(images_BxHxWxC, dtype=np.float32)
    if x_BxHxWxC.ndim != 4 or x_BxHxWxC.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected images of shape (B, H, W, C) with C in {{1, 3}}, "
            f"got {x_BxHxWxC.shape}"
        )
    x_BxHxWxC = np.nan_to_num(x_BxHxWxC, nan=0.0, posinf=1.0, neginf=0.0)
    x_BxHxWxC = np.clip(x_BxHxWxC, 0.0, 1.0)
    if x_BxHxWxC.shape[-1] == 1:
        x_BxHxWxC = np.repeat(x_BxHxWxC, 3, axis=-1)
    return np.round(x_BxHxWxC * 255.0).astype(np.uint8)


def _label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(
    draw: ImageDraw.ImageDraw, text: str, font: Any
) -> tuple[int, int]:
    """(width, height) in pixels of text rendered with font."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def image_grid(
    rows: Sequence[Any],
    row_labels: Sequence[str] | None = None,
    pad: int = 2,
    scale: int = 4,
) -> np.ndarray:
    """Tile batches of images into one RGB picture, one batch per row.

    Typical use: ``image_grid([truth, recon], ["truth", "recon"])``.

    Args:
      rows: list of arrays, each (B_r, H, W, C) with C in {1, 3}; all rows
        share H and W, B_r may differ (short rows are left blank). Values are
        clipped to [0, 1]; greyscale is expanded to RGB.
      row_labels: optional text per row, drawn in a column on the left with
        PIL's default font.
      pad: white border in output pixels around and between images.
      scale: integer nearest-neighbour upscaling factor (32x32 -> 128x128 at
        the default 4, so small images stay legible).

    Returns:
      uint8 array (H', W', 3) with
      H' = R * H * scale + (R + 1) * pad and
      W' = label_width + N * W * scale + (N + 1) * pad, where R = len(rows),
      N = max B_r and label_width = 0 without labels.
    """
    if len(rows) == 0:
        raise ValueError("image_grid needs at least one row")
    if scale < 1 or pad < 0:
        raise ValueError(f"need scale >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(
            f"got {len(row_labels)} row labels for {len(rows)} rows"
        )
    rgb_rows = [_to_rgb_uint8(r) for r in rows]
    spatial = {r.shape[1:3] for r in rgb_rows}
    if len(spatial) != 1:
        raise ValueError(f"all rows must share H and W, got {sorted(spatial)}")
    h, w = rgb_rows[0].shape[1:3]
    cell_h, cell_w = h * scale, w * scale
    n_rows = len(rgb_rows)
    n_cols = max(max(r.shape[0] for r in rgb_rows), 1)

    font = _label_font()
    label_w = 0
    if row_labels is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        widths = [_text_size(probe, str(t), font)[0] for t in row_labels]
        label_w = max(widths, default=0) + 2 * _LABEL_MARGIN

    grid_h = n_rows * cell_h + (n_rows + 1) * pad
    grid_w = label_w + n_cols * cell_w + (n_cols + 1) * pad
    grid_HxWx3 = np.full((grid_h, grid_w, 3), _BACKGROUND, dtype=np.uint8)

    for r, batch_BxHxWx3 in enumerate(rgb_rows):
        top = pad + r * (cell_h + pad)
        # Nearest-neighbour upscale: repeat every pixel scale x scale times.
        big_BxhxWx3 = batch_BxHxWx3.repeat(scale, axis=1).repeat(scale, axis=2)
        for c, img_hxwx3 in enumerate(big_BxhxWx3):
            left = label_w + pad + c * (cell_w + pad)
            grid_HxWx3[top : top + cell_h, left : left + cell_w] = img_hxwx3

    if row_labels is not None and label_w > 0:
        canvas = Image.fromarray(grid_HxWx3)
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(row_labels):
            text = str(text)
            _, text_h = _text_size(draw, text, font)
            top = pad + r * (cell_h + pad)
            y = top + max((cell_h - text_h) // 2, 0)
            draw.text((_LABEL_MARGIN, y), text, fill=_TEXT_COLOUR, font=font)
        grid_HxWx3 = np.asarray(canvas, dtype=np.uint8)
    return grid_HxWx3


def _prepare_path(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def save_grid(
    path: str | os.PathLike[str],
    rows: Sequence[Any],
    row_labels: Sequence[str] | None = None,
    pad: int = 2,
    scale: int = 4,
) -> str:
    """Render ``image_grid(rows, row_labels, pad, scale)`` and save as PNG.

    Parent directories are created. Returns the written path as a string.
    """
    grid_HxWx3 = image_grid(rows, row_labels=row_labels, pad=pad, scale=scale)
    out = _prepare_path(path)
    Image.fromarray(grid_HxWx3).save(out, format="PNG")
    return str(out)


# ---------------------------------------------------------------------------
# curve plots
# ---------------------------------------------------------------------------


def save_curve_plot(
    path: str | os.PathLike[str],
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> str:
    """Line plot of named (xs, ys) curves saved as PNG, e.g. PSNR vs noise.

    Args:
      path: output file; parent directories are created.
      curves: legend label -> (xs, ys) of equal length.
      xlabel, ylabel, title: axis labels and title.
      logx: logarithmic x axis (e.g. for noise scales); non-positive x values
        are then dropped by matplotlib.

    Returns:
      the written path as a string.
    """
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas used by savefig
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys) in curves.items():
        xs_N = np.asarray(xs, dtype=np.float64).reshape(-1)
        ys_N = np.asarray(ys, dtype=np.float64).reshape(-1)
        if xs_N.shape != ys_N.shape:
            raise ValueError(
                f"curve {name!r}: xs and ys lengths differ ({xs_N.size} vs {ys_N.size})"
            )
        # Markers keep sparse sweeps (a handful of noise levels) readable.
        ax.plot(xs_N, ys_N, marker="o" if xs_N.size <= 30 else None, label=str(name))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    out = _prepare_path(path)
    fig.savefig(out, format="png")
    return str(out)


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """Unwrap 0-d numpy / jax arrays to python scalars; pass others through."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    value = _scalar(value)
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _format_cell(value: Any, floatfmt: str) -> str:
    """Stringify one cell; floats use floatfmt, None/missing become ''."""
    if value is None:
        return ""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)):
        text = str(bool(value))
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        value = float(value)
        text = format(value, floatfmt) if math.isfinite(value) else str(value)
    else:
        text = str(value)
    # Keep the markdown structure intact.
    return text.replace("|", "\\|").replace("\n", " ")


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".2f",
) -> str:
    """Render dicts as an aligned markdown table (also fine on a console).

    Args:
      rows: one dict per table row.
      columns: column order; default is every key in order of first
        appearance across rows. Missing keys give empty cells.
      floatfmt: format spec for floats (e.g. '.2f', '.4f', '.3e').

    Returns:
      the table without trailing newline; numeric columns are right-aligned
      (``---:``). Empty string if there are no columns.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                seen.setdefault(str(key), None)
        columns = list(seen)
    columns = [str(c) for c in columns]
    if not columns:
        return ""

    cells = [[_format_cell(row.get(c), floatfmt) for c in columns] for row in rows]
    numeric = [
        any(_is_number(row.get(c)) for row in rows)
        and all(row.get(c) is None or _is_number(row.get(c)) for row in rows)
        for c in columns
    ]
    header = [c.replace("|", "\\|") for c in columns]
    widths = [
        max([len(header[j]), 3] + [len(r[j]) for r in cells]) for j in range(len(columns))
    ]

    def line(values: list[str]) -> str:
        padded = [
            v.rjust(widths[j]) if numeric[j] else v.ljust(widths[j])
            for j, v in enumerate(values)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (widths[j] - 1) + ":" if numeric[j] else "-" * widths[j]
        for j in range(len(columns))
    ]
    lines = [line(header), "| " + " | ".join(rule) + " |"]
    lines += [line(r) for r in cells]
    return "\n".join(lines)
