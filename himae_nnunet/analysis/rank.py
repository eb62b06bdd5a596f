"""Effective rank and singular values of every encoder layer's attention values V (Tang et al., Hi-End-MAE).

rho(A) = -sum_i s_i log s_i, s_i = sigma_i / sum_k sigma_k (natural log; identity n x n -> log n, rank one -> 0).

What A is, per encoder layer: the values V = (LN(x) W_v + b_v) of that layer's attention, all heads side by
side (columns = the D value features), for the patch tokens of unmasked crops (the cls token left out; the
encoder sees the whole crop, as in fine-tuning). Rows of all crops are stacked: A is (crops * N) x D, so every
layer has D singular values. They come from the eigenvalues of A^T A accumulated in float64 (no crop's tokens
are kept in memory). The reported singular values are sigma / sqrt(rows), i.e. independent of the crop count;
the effective rank is scale-free anyway. Each crop's own A (N x D) also gives an effective rank: their mean and
std show the spread across crops.
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from himae_nnunet.analysis.probe import capture_qkv, values


def effective_rank(singular_values) -> float:
    """-sum s log s over the singular values normalized to sum 1 (zeros contribute 0)."""
    s = torch.as_tensor(singular_values, dtype=torch.float64).clamp(min=0)
    total = s.sum()
    if total <= 0:
        return 0.0
    s = s / total
    s = s[s > 0]
    return float(-(s * s.log()).sum())


def singular_values_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of A from G = A^T A."""
    eig = torch.linalg.eigvalsh(gram.double())
    return eig.clamp(min=0).sqrt().flip(0)


@torch.no_grad()
def value_spectra(model, crops: np.ndarray, device="cpu", batch_size: int = 4, desc: str = "rank") -> list[dict]:
    """Per encoder layer: {"layer", "effective_rank", "exp_effective_rank", "effective_rank_per_crop_mean",
    "effective_rank_per_crop_std", "singular_values", "rows"} over `crops` [n, z, y, x] in [0, 1]."""
    encoder = model.encoder
    depth, dim = len(encoder.blocks), encoder.embed_dim
    grams = torch.zeros(depth, dim, dim, dtype=torch.float64, device=device)
    per_crop = [[] for _ in range(depth)]
    rows = 0
    with capture_qkv(encoder, range(depth)) as store:
        for start in tqdm(range(0, len(crops), batch_size), desc=desc, leave=False):
            x = torch.from_numpy(crops[start:start + batch_size]).to(device)[:, None]
            encoder(x)
            rows += x.shape[0] * encoder.num_tokens
            for layer in range(depth):
                v = values(store[layer])[:, encoder.num_prefix_tokens:].double()  # B, N, D: patch tokens only
                grams[layer] += torch.einsum("bnd,bne->de", v, v)
                per_crop[layer] += [effective_rank(s) for s in torch.linalg.svdvals(v).cpu()]
    layers = []
    for layer in range(depth):
        sigma = singular_values_from_gram(grams[layer].cpu()) / math.sqrt(rows)
        rho = effective_rank(sigma)
        layers.append(dict(layer=layer, effective_rank=rho, exp_effective_rank=math.exp(rho),
                           effective_rank_per_crop_mean=float(np.mean(per_crop[layer])),
                           effective_rank_per_crop_std=float(np.std(per_crop[layer])),
                           singular_values=[float(s) for s in sigma], rows=rows))
    return layers


def plot_rank(results: list[dict], out_dir) -> list:
    """rank_effective.png (effective rank per layer, one line per checkpoint) and rank_singular_values.png
    (one panel per layer, the checkpoints' singular values overlaid). Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        layers = [l["layer"] for l in r["layers"]]
        mean = np.array([l["effective_rank_per_crop_mean"] for l in r["layers"]])
        std = np.array([l["effective_rank_per_crop_std"] for l in r["layers"]])
        line, = ax.plot(layers, [l["effective_rank"] for l in r["layers"]], "o-", label=f"{r['name']} (all crops)")
        ax.plot(layers, mean, "--", color=line.get_color(), alpha=0.7, label=f"{r['name']} (per crop, mean ± std)")
        ax.fill_between(layers, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("encoder block (0-based)")
    ax.set_ylabel("effective rank  -Σ s log s  of V")
    ax.set_title(f"Effective rank of attention values V ({results[0]['layers'][0]['rows']} tokens)")
    ax.set_xticks(range(len(results[0]["layers"])))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "rank_effective.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    depth = max(len(r["layers"]) for r in results)
    cols = 4
    rows_ = math.ceil(depth / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 2.6 * rows_), squeeze=False, sharey=True)
    for layer in range(rows_ * cols):
        ax = axes.flat[layer]
        if layer >= depth:
            ax.axis("off")
            continue
        for r in results:
            if layer < len(r["layers"]):
                s = np.array(r["layers"][layer]["singular_values"])
                ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), label=r["name"])
        ax.set_title(f"block {layer}", fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("singular value index")
    fig.supylabel("σ / sqrt(tokens)")
    fig.suptitle("Singular values of attention values V per encoder block")
    fig.tight_layout()
    paths.append(out_dir / "rank_singular_values.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
