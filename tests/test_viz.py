"""Tests for gitjax.viz (grids, PNG output, plots, tables)."""

import numpy as np
import pytest
from PIL import Image

from gitjax import viz


def test_image_grid_shape_dtype_and_pixels():
    truth = np.zeros((3, 8, 8, 1), np.float32)
    truth[0] = 1.0
    recon = np.full((2, 8, 8, 3), 0.5, np.float32)
    recon[1, ..., 0] = 2.0  # out of range: must be clipped to 255
    grid = viz.image_grid([truth, recon], pad=2, scale=4)
    assert grid.dtype == np.uint8
    # 2 rows x 3 cols of 32x32 cells with 2 px padding.
    assert grid.shape == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2, 3)
    # First cell (white truth image), second cell (black), padding white.
    np.testing.assert_array_equal(grid[2:34, 2:34], 255)
    np.testing.assert_array_equal(grid[2:34, 36:68], 0)
    np.testing.assert_array_equal(grid[0:2, :], 255)
    # Row 2: grey 0.5 -> 128; second image red channel clipped to 255.
    np.testing.assert_array_equal(grid[36:68, 2:34], 128)
    np.testing.assert_array_equal(grid[36:68, 36:68, 0], 255)
    np.testing.assert_array_equal(grid[36:68, 36:68, 1], 128)
    # Missing third image in row 2 leaves background.
    np.testing.assert_array_equal(grid[36:68, 70:102], 255)


def test_image_grid_nearest_neighbour_upscale():
    img = np.zeros((1, 2, 2, 1), np.float32)
    img[0, 0, 1, 0] = 1.0
    grid = viz.image_grid([img], pad=0, scale=3)
    assert grid.shape == (6, 6, 3)
    np.testing.assert_array_equal(grid[0:3, 3:6], 255)
    np.testing.assert_array_equal(grid[0:3, 0:3], 0)
    np.testing.assert_array_equal(grid[3:6, :], 0)


def test_image_grid_labels_add_left_column_with_text():
    rows = [np.zeros((2, 8, 8, 3), np.float32)] * 2
    plain = viz.image_grid(rows, pad=2, scale=2)
    labelled = viz.image_grid(rows, row_labels=["truth", "reconstruction"], pad=2, scale=2)
    assert labelled.shape[0] == plain.shape[0]
    extra = labelled.shape[1] - plain.shape[1]
    assert extra > 0
    # Label area is white background with some dark text pixels drawn.
    label_area = labelled[:, :extra]
    assert (label_area < 128).any() and (label_area == 255).mean() > 0.5
    np.testing.assert_array_equal(labelled[:, extra:], plain)


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        viz.image_grid([np.zeros((2, 8, 8, 2), np.float32)])
    with pytest.raises(ValueError):
        viz.image_grid([np.zeros((2, 8, 8, 3)), np.zeros((2, 9, 8, 3))])
    with pytest.raises(ValueError):
        viz.image_grid([np.zeros((2, 8, 8, 3))], row_labels=["a", "b"])


def test_save_grid_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.random((4, 32, 32, 3)), rng.random((4, 32, 32, 1))]
    path = tmp_path / "nested" / "dir" / "grid.png"
    out = viz.save_grid(path, rows, pad=2, scale=4)
    assert out == str(path)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        assert im.size == (4 * 128 + 5 * 2, 2 * 128 + 3 * 2)  # (W, H)
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels, viz.image_grid(rows, pad=2, scale=4))


def test_save_curve_plot(tmp_path):
    path = tmp_path / "plots" / "psnr_vs_noise.png"
    curves = {
        "dlg": ([1e-4, 1e-3, 1e-2], [30.0, 22.0, 12.0]),
        "invgrad": ([1e-4, 1e-3, 1e-2], [28.0, 24.0, 15.0]),
    }
    out = viz.save_curve_plot(path, curves, "noise std", "PSNR (dB)", "PSNR vs noise", logx=True)
    assert out == str(path)
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
        arr = np.asarray(im.convert("RGB"))
    assert w > 100 and h > 100
    assert arr.std() > 0  # not a blank canvas


def test_save_curve_plot_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="lengths"):
        viz.save_curve_plot(tmp_path / "x.png", {"a": ([1, 2], [1])}, "x", "y", "t")


def test_format_table_contents_and_alignment():
    rows = [
        {"method": "dlg", "psnr": 12.3456, "ssim": np.float32(0.5)},
        {"method": "git", "psnr": 25.0, "ssim": 0.91234, "note": "a|b"},
    ]
    table = viz.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["method", "psnr", "ssim", "note"]
    assert "12.35" in lines[2] and "0.50" in lines[2]
    assert "25.00" in lines[3] and "0.91" in lines[3]
    assert "a\\|b" in lines[3]  # pipe escaped so columns stay intact
    assert "---:" in lines[1]  # numeric columns right-aligned
    # All lines equally wide (aligned for console output).
    assert len({len(line) for line in lines}) == 1


def test_format_table_columns_and_floatfmt():
    rows = [{"a": 1, "b": 0.123456, "c": "x"}, {"a": 2, "b": None}]
    table = viz.format_table(rows, columns=["b", "a"], floatfmt=".4f")
    lines = table.splitlines()
    assert "c" not in lines[0] and lines[0].index("b") < lines[0].index("a")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["b", "a"]
    assert cells[2] == ["0.1235", "1"]
    assert cells[3] == ["", "2"]  # None -> empty cell
    assert viz.format_table([]) == ""
