"""PNG previews of pretraining: axial, coronal and sagittal slices of input, masked input and reconstruction."""
from pathlib import Path

import numpy as np
import torch

from himae_nnunet.core.atomic import replacing


@torch.no_grad()
def save_preview(model, x: torch.Tensor, perm: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """One crop x [1, 1, H, W, D] (z, y, x axes) with its token permutation [1, N] -> a 3 x 3 PNG grid.

    The reconstruction column shows predicted patches where tokens were masked and the input elsewhere."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    try:
        out = model(x.float(), shuffle_indices=perm)
        recon, visible = model.reconstruct(x.float(), out)
    finally:
        model.train(was_training)
    img = x[0, 0].float().cpu().numpy()
    vis = visible[0, 0].float().cpu().numpy()
    rec = np.clip(vis * img + (1 - vis) * recon[0, 0].float().cpu().numpy(), 0, 1)
    masked = np.ma.masked_where(vis < 0.5, img)
    columns = (("input", img), (f"masked ({1 - out.num_visible / perm.shape[1]:.0%})", masked),
               ("reconstruction", rec))
    views = (("axial", lambda a: a[a.shape[0] // 2]), ("coronal", lambda a: a[:, a.shape[1] // 2]),
             ("sagittal", lambda a: a[:, :, a.shape[2] // 2]))
    cmap = plt.get_cmap("gray").with_extremes(bad="tab:blue")  # masked tokens in blue
    fig, axes = plt.subplots(3, 3, figsize=(7.5, 7.8))
    for r, (view, cut) in enumerate(views):
        for c, (name, vol) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(cut(vol), cmap=cmap, vmin=0, vmax=1, origin="upper" if r == 0 else "lower",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(view, fontsize=10)
    fig.suptitle(f"{title}  loss {out.loss.item():.4f}".strip(), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
