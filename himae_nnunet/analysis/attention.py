"""Attention of one query patch to every patch, per encoder block and head, on an unmasked crop around it.

Blocks are 0-based. The default is the encoder's taps plus its last block (3, 6, 9, 11 for the 12-block
presets): the blocks the dense decoder and the UNETR read, which the paper's figure labels "3rd, 6th, 9th"
and "12th". Maps are the rows of softmax(q k^T * scale) recomputed from each block's qkv projection (the
fused kernel does not return them); the cls column is left out of the picture and reported as `cls_share`.
"""
import numpy as np
import torch

from himae_nnunet.analysis.figures import grid_to_voxels, overlay, plane, plane_point, pyplot, show
from himae_nnunet.analysis.probe import attention_probs, capture_qkv, encoder_rope


def default_blocks(model) -> list[int]:
    return sorted({*model.config["taps"], model.config["depth"] - 1})


def token_of_voxel(model, voxel) -> int:
    """Token index (h-major over the grid) of the patch holding crop voxel (z, y, x)."""
    p = model.config["patch_size"]
    gz, gy, gx = (int(v) // p for v in voxel)
    _, ny, nx = model.grid
    return (gz * ny + gy) * nx + gx


@torch.no_grad()
def query_attention(model, crop: np.ndarray, voxel, blocks, device="cpu") -> dict:
    """{"query_token", "blocks": {block: {"maps" [heads, N] (patch tokens), "cls_share" [heads]}}}."""
    token = token_of_voxel(model, voxel)
    encoder = model.encoder
    with capture_qkv(encoder, blocks) as store:
        encoder(torch.from_numpy(crop).to(device)[None, None])
    out, P, rope = {}, encoder.num_prefix_tokens, encoder_rope(encoder)
    for b in blocks:
        probs = attention_probs(store[b], encoder.blocks[b].attn, rope)[0, :, P + token].cpu().numpy()  # heads, P + N
        out[b] = dict(maps=probs[:, P:], cls_share=probs[:, 0] if P else np.zeros(probs.shape[0]))
    return dict(query_token=token, blocks=out)


def summary(result: dict) -> dict:
    """JSON-able per-block, per-head statistics of the maps (max, entropy in nats, cls share)."""
    blocks = {}
    for b, r in result["blocks"].items():
        m = r["maps"] / r["maps"].sum(1, keepdims=True)
        blocks[str(b)] = dict(
            cls_share=[float(v) for v in r["cls_share"]],
            max=[float(v) for v in r["maps"].max(1)],
            entropy=[float(-(row[row > 0] * np.log(row[row > 0])).sum()) for row in m])
    return dict(query_token=result["query_token"], blocks=blocks)


def _columns(result: dict):
    heads = next(iter(result["blocks"].values()))["maps"].shape[0]
    return [f"head {h}" for h in range(heads)] + ["mean of heads"]


def plot_attention(model, crop, voxel, result, spacing, title, path, mode="slice") -> None:
    """Rows = blocks, columns = heads + their mean; axial view: `slice` through the query or the
    maximum projection (`mip`) of the attention over z, on the scan (slice resp. mean projection)."""
    plt = pyplot()
    p, grid = model.config["patch_size"], model.grid
    cols, blocks = _columns(result), list(result["blocks"])
    fig, axes = plt.subplots(len(blocks), len(cols), figsize=(1.9 * len(cols), 2.0 * len(blocks) + 0.6),
                             squeeze=False)
    scan = plane(crop, "axial", voxel) if mode == "slice" else crop.mean(0)
    if mode == "mip":  # a mean projection is low in contrast: stretch it to [0, 1]
        scan = (scan - scan.min()) / max(float(scan.max() - scan.min()), 1e-6)
    for row, b in enumerate(blocks):
        maps = result["blocks"][b]["maps"]
        for col, m in enumerate(list(maps) + [maps.mean(0)]):
            vol = grid_to_voxels(m, grid, p)
            heat = plane(vol, "axial", voxel) if mode == "slice" else vol.max(0)
            ax = axes[row, col]
            show(ax, scan, "axial", spacing, cmap="gray", vmin=0, vmax=1)
            overlay(ax, heat, "axial", spacing)
            ax.plot(*plane_point(voxel, "axial"), "c+", ms=9, mew=1.5)
            if row == 0:
                ax.set_title(cols[col], fontsize=8)
            if col == 0:
                ax.set_ylabel(f"block {b}", fontsize=9)
    what = "axial slice through the query" if mode == "slice" else "max projection over z on the mean scan"
    fig.suptitle(f"{title}: attention of the query patch (+), {what};\neach panel stretched from its min "
                 f"(clear) to its max (yellow)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_comparison(entries, path) -> None:
    """Rows = checkpoints; columns = the scan, then head-averaged attention per block, in the axial and
    coronal slices through the query. `entries`: (name, model, crop, voxel, spacing, result)."""
    plt = pyplot()
    blocks = list(entries[0][-1]["blocks"])
    ncol = 1 + 2 * len(blocks)
    fig, axes = plt.subplots(len(entries), ncol, figsize=(1.9 * ncol, 2.1 * len(entries) + 0.5), squeeze=False)
    for row, (name, model, crop, voxel, spacing, result) in enumerate(entries):
        ax = axes[row, 0]
        show(ax, plane(crop, "axial", voxel), "axial", spacing, cmap="gray", vmin=0, vmax=1)
        ax.plot(*plane_point(voxel, "axial"), "c+", ms=9, mew=1.5)
        ax.set_ylabel(name, fontsize=8)
        if row == 0:
            ax.set_title("scan, query +", fontsize=8)
        for i, b in enumerate(list(result["blocks"])[:len(blocks)]):
            vol = grid_to_voxels(result["blocks"][b]["maps"].mean(0), model.grid, model.config["patch_size"])
            for j, view in enumerate(("axial", "coronal")):
                ax = axes[row, 1 + 2 * i + j]
                heat = plane(vol, view, voxel)
                show(ax, plane(crop, view, voxel), view, spacing, cmap="gray", vmin=0, vmax=1)
                overlay(ax, heat, view, spacing)
                ax.plot(*plane_point(voxel, view), "c+", ms=9, mew=1.5)
                if row == 0:
                    ax.set_title(f"block {b}, {view}", fontsize=8)
    fig.suptitle("Head-averaged attention of the query patch per block (each panel stretched from its min (clear) "
                 "to its max (yellow))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
