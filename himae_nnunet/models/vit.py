"""The 3D ViT encoder shared by pretraining (Hi-End-MAE / MAE) and fine-tuning (UNETR).

Token order follows the authors' code: patches ordered (gh, gw, gd), h-major; values inside a patch
ordered (ph, pw, pd, c). Blocks are timm's pre-norm ViT blocks (LayerNorm eps 1e-6, qkv bias, GELU).
"""
from functools import partial

import torch
from torch import nn
from timm.models.vision_transformer import Block

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W, D] -> [B, N, p^3 * C] with N = (H/p)(W/p)(D/p), values ordered (ph, pw, pd, c)."""
    B, C, H, W, D = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p, D // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, gh, gw, gd, ph, pw, pd, C
    return x.reshape(B, (H // p) * (W // p) * (D // p), p ** 3 * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """Inverse of `patchify`: [B, N, p^3 * C] -> [B, C, gh*p, gw*p, gd*p]."""
    gh, gw, gd = grid
    B = x.shape[0]
    x = x.reshape(B, gh, gw, gd, p, p, p, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, gh, ph, gw, pw, gd, pd
    return x.reshape(B, channels, gh * p, gw * p, gd * p)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed 3D sin-cos table [N, dim]: per axis dim/6 frequencies 1/10000^(i/(dim/6)),
    laid out [sin h, cos h, sin w, cos w, sin d, cos d]; grid from meshgrid 'ij', flattened h-major."""
    if dim % 6:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 6, got {dim}")
    f = dim // 6
    omega = 1.0 / 10000 ** (torch.arange(f, dtype=torch.float64) / f)
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = []
    for a in axes:
        angle = a.reshape(-1, 1) * omega[None]  # N, f
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


def resize_pos_embed(table: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Trilinear resize of a [1, N, D] position table from one token grid to another."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    D = table.shape[-1]
    t = table.reshape(1, *old_grid, D).permute(0, 4, 1, 2, 3)
    t = nn.functional.interpolate(t, size=tuple(new_grid), mode="trilinear", align_corners=False)
    return t.permute(0, 2, 3, 4, 1).reshape(1, -1, D)


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = p: [B, C, H, W, D] -> [B, N, dim]."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # conv grid (gh, gw, gd) flattens h-major

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The same conv as a linear map on patchified values [B, n, p^3*C] ordered (ph, pw, pd, c)."""
        B, n, _ = patches.shape
        p, C = self.patch_size, self.proj.in_channels
        cubes = patches.reshape(B * n, p, p, p, C).permute(0, 4, 1, 2, 3)  # B*n, C, p, p, p
        return self.proj(cubes).reshape(B, n, self.proj.out_channels)  # conv on one patch each: the same sums as the full conv


def _gather(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, c] at indices [B, n] -> [B, n, c]."""
    return torch.gather(tokens, 1, indices[..., None].expand(-1, -1, tokens.shape[-1]))


class ViTEncoder3D(nn.Module):
    """ViT with cls token; sees cls + the visible tokens only when a permutation is given.

    `grid` is the token grid this instance is built for (crop / patch); the position table is made for it.
    `norm_eps` is the LayerNorm epsilon of every block and of the final norm: 1e-6 as in pretraining; the
    authors' downstream UNETR (MONAI's ViT) runs the same weights with torch's default 1e-5.
    """

    num_prefix_tokens = 1  # the cls token

    @classmethod
    def from_config(cls, config: dict, grid: tuple[int, int, int], **overrides) -> "ViTEncoder3D":
        """The encoder of a model config (`presets.model_config`) for token grid `grid`."""
        fields = dict(patch_size=config["patch_size"], embed_dim=config["embed_dim"], depth=config["depth"],
                      num_heads=config["num_heads"], in_chans=config["in_chans"], mlp_ratio=config["mlp_ratio"],
                      pos_embed=config["pos_embed"])
        return cls(grid=tuple(grid), **{**fields, **overrides})

    def __init__(self, *, patch_size: int, embed_dim: int, depth: int, num_heads: int, grid: tuple[int, int, int],
                 in_chans: int = 1, mlp_ratio: float = 4.0, pos_embed: str = "sincos", norm_eps: float = 1e-6):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.patch_size, self.embed_dim, self.grid = patch_size, embed_dim, tuple(grid)
        self.num_tokens = grid[0] * grid[1] * grid[2]
        self.patch_embed = PatchEmbed3D(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed == "sincos":  # fixed; persistent so that encoder keys are the same for both kinds
            self.register_buffer("pos_embed", sincos_pos_embed_3d(embed_dim, self.grid)[None])
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
            nn.init.normal_(self.pos_embed, std=0.02)
        self.pos_embed_type = pos_embed
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth))
        self.norm = norm_layer(embed_dim)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, visible_indices: torch.Tensor | None = None):
        """x [B, C, H, W, D]; visible_indices [B, n_vis] token ids to keep (in that order), or None for all.

        Returns (normed output [B, 1 + n, dim], list of every block's raw output [B, 1 + n, dim])."""
        if visible_indices is None:
            tokens = self.patch_embed(x) + self.pos_embed  # B, N, dim (cls gets no position)
        else:  # gather first: neither the embedding nor the blocks do any work on masked tokens
            patches = _gather(patchify(x, self.patch_size), visible_indices)  # B, n_vis, p^3*C
            tokens = self.patch_embed.embed_patches(patches) + _gather(
                self.pos_embed.expand(x.shape[0], -1, -1), visible_indices)  # B, n_vis, dim
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        hidden_states = []
        for block in self.blocks:
            x = block(x)
            hidden_states.append(x)
        return self.norm(x), hidden_states

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay besides biases and norms (core.optim's rule); timm's convention."""
        return {"cls_token", "pos_embed"}


def _init_weights(m: nn.Module) -> None:
    """MAE-style init: xavier-uniform linears, zero biases, unit norms; conv patch embed as a linear."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, PatchEmbed3D):
        nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
        nn.init.zeros_(m.proj.bias)
