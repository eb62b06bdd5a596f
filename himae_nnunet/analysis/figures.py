"""Shared plotting for the analysis figures: orthogonal slices of (z, y, x) crops with the right aspect."""
import numpy as np

PLANES = ("axial", "coronal", "sagittal")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plane(volume: np.ndarray, name: str, index) -> np.ndarray:
    """2D view of a (z, y, x) volume through voxel `index` (z, y, x); coronal/sagittal have z upwards
    when shown with origin='lower'."""
    z, y, x = index
    return {"axial": volume[z], "coronal": volume[:, y, :], "sagittal": volume[:, :, x]}[name]


def plane_aspect(spacing, name: str) -> float:
    sz, sy, sx = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[name]


def plane_point(index, name: str) -> tuple[float, float]:
    """(column, row) of voxel `index` in the view `name`."""
    z, y, x = index
    return {"axial": (x, y), "coronal": (x, z), "sagittal": (y, z)}[name]


def show(ax, image, name: str, spacing, **kwargs):
    """imshow of a plane with radiological orientation (axial as stored, others z upwards)."""
    ax.imshow(image, origin="upper" if name == "axial" else "lower", aspect=plane_aspect(spacing, name),
              interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def grid_to_voxels(tokens: np.ndarray, grid, patch: int) -> np.ndarray:
    """Per-token values [N] (h-major token order) -> a voxel volume, each patch filled with its token's value."""
    g = tokens.reshape(grid)
    return g.repeat(patch, 0).repeat(patch, 1).repeat(patch, 2)


def overlay(ax, heat: np.ndarray, name: str, spacing, max_alpha: float = 0.6) -> None:
    """Heat map stretched from its own min to its max, coloured (inferno) and as opaque as it is hot, over
    what `ax` shows; its max is written in the corner."""
    from matplotlib import colormaps
    lo, hi = float(heat.min()), float(heat.max())
    h = (heat - lo) / max(hi - lo, 1e-12)
    rgba = colormaps["inferno"](h)
    rgba[..., 3] = max_alpha * h
    show(ax, rgba, name, spacing)
    ax.text(0.02, 0.02, f"max {hi:.3g}", transform=ax.transAxes, fontsize=6, color="w",
            bbox=dict(facecolor="k", alpha=0.5, pad=1, lw=0))
