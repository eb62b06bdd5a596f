"""Masked input and reconstruction of one crop at several mask ratios.

One random permutation (from the seed) serves every ratio, so the visible set of a higher ratio is a subset
of a lower one's. Predicted patches are brought back to intensities with each true patch's mean and std, as
the authors' code does; the figure pastes the visible patches back (the MAE convention)."""
from contextlib import contextmanager

import numpy as np
import torch

from himae_nnunet.core.errors import UserError
from himae_nnunet.analysis.figures import PLANES, plane, pyplot, show


@contextmanager
def mask_ratio(model, ratio: float):
    """Temporarily run `model` at another mask ratio (the model reads it from its config)."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"mask ratio {ratio} must be in [0, 1)")
    if int(model.num_tokens * (1 - ratio)) < 1:
        raise UserError(f"mask ratio {ratio} leaves no visible token of {model.num_tokens}; use a lower ratio")
    old = model.config["mask_ratio"]
    model.config["mask_ratio"] = float(ratio)
    try:
        yield model
    finally:
        model.config["mask_ratio"] = old


@torch.no_grad()
def reconstruct_at(model, crop: np.ndarray, ratios, seed: int = 0, device="cpu", inside=None) -> list[dict]:
    """Per ratio: reconstruction and visibility (z, y, x), visible tokens, the model's loss, and the MSE of
    the reconstruction on masked voxels ([0, 1] intensity scale) that are `inside` the scan (not padding)."""
    x = torch.from_numpy(crop).to(device)[None, None]
    perm = model.random_permutation(1, generator=torch.Generator().manual_seed(seed)).to(device)
    results = []
    for r in ratios:
        with mask_ratio(model, r):
            out = model(x, perm)
            rec, vis = model.reconstruct(x, out)
        rec, vis = rec[0, 0].cpu().numpy(), vis[0, 0].cpu().numpy() > 0.5
        masked = ~vis if inside is None else ~vis & inside
        results.append(dict(mask_ratio=float(r), num_visible=int(out.num_visible), loss=float(out.loss),
                            masked_mse=float(((rec - crop)[masked] ** 2).mean()) if masked.any() else 0.0,
                            reconstruction=rec, visible=vis))
    return results


def plot_reconstructions(crop, voxel, results, spacing, title, path) -> None:
    """Rows = mask ratios; per plane (axial, coronal, sagittal through `voxel`): input, masked input
    (masked patches blue), reconstruction with the visible patches pasted back."""
    plt = pyplot()
    cmap = plt.get_cmap("gray").with_extremes(bad=(0.15, 0.25, 0.55))
    cols = [(view, kind) for view in PLANES for kind in ("input", "masked", "reconstruction")]
    fig, axes = plt.subplots(len(results), len(cols), figsize=(1.8 * len(cols), 1.9 * len(results) + 0.6),
                             squeeze=False)
    for row, r in enumerate(results):
        pasted = np.where(r["visible"], crop, np.clip(r["reconstruction"], 0, 1))
        images = {"input": crop, "masked": np.where(r["visible"], crop, np.nan), "reconstruction": pasted}
        for col, (view, kind) in enumerate(cols):
            ax = axes[row, col]
            show(ax, plane(images[kind], view, voxel), view, spacing, cmap=cmap, vmin=0, vmax=1)
            if row == 0:
                ax.set_title(f"{view}\n{kind}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"mask {r['mask_ratio']:.2f}\nMSE {r['masked_mse']:.4f}", fontsize=8)
    fig.suptitle(f"{title}: masked input and reconstruction (visible patches pasted back; "
                 f"MSE on masked voxels)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
