"""Hi-End-MAE: masked autoencoder whose decoder queries the encoder's intermediate blocks.

Read top to bottom: CrossAttention -> CrossBlock -> DenseDecoder -> HiEndMAE. With stages B = 0 the
decoder is 8 plain self-attention blocks and the model is the decoder-driven MAE baseline. The encoder is our
ViT (with a cls token, as the authors') or nnU-Net's Primus (no prefix token); `P` below is its number of prefix
tokens (1 or 0).
"""
from dataclasses import dataclass

import torch
from torch import nn
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block

from himae_nnunet.models.presets import model_config
from himae_nnunet.models.vit import (LayerNorm, ViTEncoder3D, _init_weights, patchify, sincos_pos_embed_3d, unpatchify)


def build_encoder(config: dict, grid: tuple[int, int, int]) -> nn.Module:
    """The encoder a model config names (`encoder`: "vit" or "primus") for token grid `grid`."""
    if config.get("encoder", "vit") == "primus":
        from himae_nnunet.models.primus import PrimusEncoder3D  # needs dynamic-network-architectures' Eva
        return PrimusEncoder3D.from_config(config, grid)
    return ViTEncoder3D.from_config(config, grid)


class CrossAttention(nn.Module):
    """Queries from the decoder stream, keys/values from projected encoder tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # B, h, N, c
        k, v = self.kv(context).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, M, c]
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossBlock(nn.Module):
    """Pre-norm: x += SelfAttn(LN x); x += CrossAttn(LN x, tap tokens); x += MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm0 = LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm1 = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), context)  # context: no norm, no position embedding
        return x + self.mlp(self.norm2(x))


class DenseDecoder(nn.Module):
    """(8 - 2B) self-attention blocks, then B cross blocks (deepest tap first), norm, linear head."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, stages: int, total_blocks: int = 8,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                    for _ in range(total_blocks - 2 * stages))
        self.cross_attention_blocks = nn.ModuleList(CrossBlock(dim, num_heads, mlp_ratio) for _ in range(stages))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, contexts: list[torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        for block, context in zip(self.cross_attention_blocks, contexts):
            x = block(x, context)
        return self.head(self.norm(x))


@dataclass
class MAEOutput:
    loss: torch.Tensor  # scalar: MSE on masked tokens vs per-patch-normalized targets
    decoder_out: torch.Tensor  # B, P + N, p^3*C: (cls,) visible, masked, in permutation order
    hidden_states: list  # depth x [B, P + n_vis, D]: every encoder block's raw output
    encoder_out: torch.Tensor  # B, P + n_vis, D: final-normed encoder output
    shuffle_indices: torch.Tensor  # B, N: the permutation used (first n_vis visible)
    num_visible: int


class HiEndMAE(nn.Module):
    """Pretraining model. `config` is a dict from `presets.model_config` (kept as `self.config`)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = cfg = model_config(**config)
        p, C = cfg["patch_size"], cfg["in_chans"]
        self.grid = tuple(c // p for c in cfg["crop_size"])
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.encoder = build_encoder(cfg, self.grid)
        self.prefix = self.encoder.num_prefix_tokens  # P: 1 (cls) for the ViT, 0 for Primus
        # taps used by the B stages, deepest first (stage 1 queries the deepest tap)
        self.stage_taps = tuple(sorted(cfg["taps"], reverse=True)[:cfg["stages"]])
        # projections: [final output, then one per used tap in stage order]; order matches the authors' import
        self.encoder_to_decoder = nn.ModuleList(nn.Linear(cfg["embed_dim"], cfg["decoder_dim"])
                                                for _ in range(1 + cfg["stages"]))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg["decoder_dim"]))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(cfg["decoder_dim"], self.grid)[None],
                             persistent=False)
        self.decoder = DenseDecoder(cfg["decoder_dim"], cfg["decoder_heads"], p ** 3 * C, cfg["stages"],
                                    cfg["decoder_blocks"], cfg["mlp_ratio"])
        self.encoder_to_decoder.apply(_init_weights)
        self.decoder.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The mask token; the encoder declares its own (core.optim collects every module's declaration)."""
        return {"mask_token"}

    @property
    def num_visible(self) -> int:
        return int(self.num_tokens * (1 - self.config["mask_ratio"]))

    def random_permutation(self, batch: int, device=None, generator: torch.Generator | None = None):
        """Per-sample random permutation (argsort of uniform noise), as the authors draw it."""
        noise = torch.rand(batch, self.num_tokens, device=device, generator=generator)
        return noise.argsort(dim=1)

    def forward(self, x: torch.Tensor, shuffle_indices: torch.Tensor | None = None) -> MAEOutput:
        B = x.shape[0]
        if shuffle_indices is None:
            shuffle_indices = self.random_permutation(B, x.device)
        n_vis = self.num_visible
        latent, hidden_states = self.encoder(x, shuffle_indices[:, :n_vis])  # B, P + n_vis, D

        # query stream: projected encoder output, then one mask token per masked position (permutation order)
        q = self.encoder_to_decoder[0](latent)
        masks = self.mask_token.expand(B, self.num_tokens - n_vis, -1)
        q = torch.cat([q, masks.to(q.dtype)], dim=1)  # B, P + N, d
        pos = self.decoder_pos_embed.expand(B, -1, -1)
        pos = torch.gather(pos, 1, shuffle_indices[..., None].expand(-1, -1, pos.shape[-1]))
        P = self.prefix
        q = torch.cat([q[:, :P], q[:, P:] + pos], dim=1)  # no position on cls
        contexts = [proj(hidden_states[t]) for proj, t in zip(self.encoder_to_decoder[1:], self.stage_taps)]
        pred = self.decoder(q, contexts)  # B, P + N, p^3*C

        target = self.normalized_patches(x, shuffle_indices[:, n_vis:])
        loss = ((pred[:, P + n_vis:].float() - target) ** 2).mean()
        return MAEOutput(loss, pred, hidden_states, latent, shuffle_indices, n_vis)

    def normalized_patches(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Patches at `indices`, each normalized by its own mean and (biased) std, eps 1e-6 inside the sqrt."""
        patches = patchify(x.float(), self.config["patch_size"])
        patches = torch.gather(patches, 1, indices[..., None].expand(-1, -1, patches.shape[-1]))
        return nn.functional.layer_norm(patches, patches.shape[-1:], eps=1e-6)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, out: MAEOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction back in image space: (reconstruction [B, C, H, W, D], visibility mask [B, 1, H, W, D]).

        Predicted patches are un-normalized with each original patch's mean and std and put back in the
        original token order."""
        p, C = self.config["patch_size"], self.config["in_chans"]
        rec = self.reconstruct_patches(x, out)
        visible = torch.zeros(x.shape[0], self.num_tokens, p ** 3, device=x.device)
        visible.scatter_(1, out.shuffle_indices[:, :out.num_visible, None].expand(-1, -1, p ** 3), 1.0)
        return unpatchify(rec, p, self.grid, C), unpatchify(visible, p, self.grid, 1)

    @torch.no_grad()
    def reconstruct_patches(self, x: torch.Tensor, out: MAEOutput) -> torch.Tensor:
        """[B, N, p^3*C] in original token order: prediction * patch std + patch mean.

        As in the authors' code, the std here uses the unbiased variance (torch.var's default), unlike
        the biased one of the loss's normalization; the fixture pins this down."""
        patches = patchify(x.float(), self.config["patch_size"])
        mean = patches.mean(-1, keepdim=True)
        std = (patches.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
        order = out.shuffle_indices.argsort(dim=1)  # token id -> position in the permutation
        pred = torch.gather(out.decoder_out[:, self.prefix:].float(), 1, order[..., None].expand(-1, -1, patches.shape[-1]))
        return pred * std + mean
