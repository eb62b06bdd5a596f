"""Parameters and forward multiply-accumulates per crop, from torch's flop counter.

torch's counter has no formula for the fused CPU attention kernel (it would count 0), so counting runs
under the math SDPA backend, where attention decomposes into matmuls that are counted.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from himae_nnunet.models.hiend_mae import HiEndMAE
from himae_nnunet.models.presets import PRESETS, model_config


def table_presets() -> list[str]:
    """The presets of docs/flops.md: every ViT and the tiny Primus. Primus S/B/M/L at 96^3 (1728 tokens through
    the full-attention decoder) take minutes each on a CPU: `himae-nnunet flops --model primus_b`."""
    return [m for m, c in PRESETS.items() if c.get("encoder", "vit") == "vit" or m == "primus_tiny"]


def _count_macs(fn) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2


def count(model_name: str, stages: int = 3, crop: int = 96, mask_ratio: float = 0.75) -> dict:
    cfg = model_config(model_name, stages=stages, crop_size=crop, mask_ratio=mask_ratio)
    model = HiEndMAE(cfg).eval()
    x = torch.rand(1, cfg["in_chans"], *cfg["crop_size"])
    perm = model.random_permutation(1, generator=torch.Generator().manual_seed(0))
    n_vis = model.num_visible
    total = _count_macs(lambda: model(x, perm))
    encoder = _count_macs(lambda: model.encoder(x, perm[:, :n_vis]))
    latent, hidden = model.encoder(x, perm[:, :n_vis])
    proj = _count_macs(lambda: [model.encoder_to_decoder[0](latent)] +
                       [p(hidden[t]) for p, t in zip(model.encoder_to_decoder[1:], model.stage_taps)])
    decoder = total - encoder  # projections + decoder blocks + head (the loss has no matmuls)
    # attention products (QK^T and AV) of the cross blocks, which the paper's Table 7 left out of its count
    # (its counter skipped their fused kernels): self-attention over all tokens plus cross-attention
    n_q, n_kv, d = model.prefix + model.num_tokens, model.prefix + n_vis, cfg["decoder_dim"]
    cross_attn_products = stages * 2 * n_q * (n_q + n_kv) * d
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    all_params = sum(p.numel() for p in model.parameters())
    return {
        "model": model_name, "stages": stages, "crop": list(cfg["crop_size"]), "mask_ratio": mask_ratio,
        "tokens": model.num_tokens, "visible_tokens": n_vis,
        "encoder_params": enc_params, "decoder_params": all_params - enc_params,
        "encoder_gmacs": round(encoder / 1e9, 3),
        "decoder_gmacs": round(decoder / 1e9, 3),
        "decoder_blocks_and_head_gmacs": round((decoder - proj) / 1e9, 3),
        "projection_gmacs": round(proj / 1e9, 3),
        "total_gmacs": round(total / 1e9, 3),
        "decoder_gmacs_paper_convention": round((decoder - proj - cross_attn_products) / 1e9, 3),
    }


def format_table(rows: list[dict]) -> str:
    head = ("| model | B | encoder params (M) | decoder params (M) | encoder GMACs | decoder GMACs | of which "
            "projections | total GMACs | decoder, paper's convention |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {r['model']} | {r['stages']} | {r['encoder_params'] / 1e6:.2f} | {r['decoder_params'] / 1e6:.2f} | "
        f"{r['encoder_gmacs']:.2f} | {r['decoder_gmacs']:.2f} | {r['projection_gmacs']:.2f} | "
        f"{r['total_gmacs']:.2f} | {r['decoder_gmacs_paper_convention']:.2f} |" for r in rows]
    return "\n".join(lines)
