"""nnU-Net's Primus encoder for pretraining: dynamic-network-architectures' own `PatchEmbed` and `Eva`.

The module names are Primus' own (`down_projection`, `eva`), so the encoder's state dict is, key for key, the
encoder part of the `Primus` network that nnU-Net's stock `nnUNet_Primus_{S,B,M,L}_Trainer` build; export only
strips the `encoder.` prefix (and resizes the absolute position table to the fine-tuning grid).

What differs from `Primus.forward` is only what masked pretraining needs: the visible tokens are chosen by our
permutation (not timm's `PatchDropout`, so samples stay a pure function of the seed), the rotary embedding is
gathered for exactly those tokens (as timm's Eva does for dropped patches, with the head axis it needs), and every block's output is kept for
the dense decoder's taps. There is no cls token (`num_prefix_tokens = 0`).
"""
import torch
from torch import nn
from dynamic_network_architectures.building_blocks.eva import Eva
from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchEmbed
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from timm.layers import apply_keep_indices_nlc


class PrimusEncoder3D(nn.Module):
    """Primus' patch embedding + EVA transformer; sees only the visible tokens when indices are given."""

    num_prefix_tokens = 0

    @classmethod
    def from_config(cls, config: dict, grid: tuple[int, int, int], **overrides) -> "PrimusEncoder3D":
        fields = dict(patch_size=config["patch_size"], embed_dim=config["embed_dim"], depth=config["depth"],
                      num_heads=config["num_heads"], in_chans=config["in_chans"], mlp_ratio=config["mlp_ratio"],
                      init_values=config.get("init_values"), scale_attn_inner=config.get("scale_attn_inner", False))
        return cls(grid=tuple(grid), **{**fields, **overrides})

    def __init__(self, *, patch_size: int, embed_dim: int, depth: int, num_heads: int, grid: tuple[int, int, int],
                 in_chans: int = 1, mlp_ratio: float = 4 * 2 / 3, init_values: float | None = 0.1,
                 scale_attn_inner: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        self.patch_size, self.embed_dim, self.grid = patch_size, embed_dim, tuple(grid)
        self.num_tokens = grid[0] * grid[1] * grid[2]
        self.pos_embed_type = "learnable"
        self.down_projection = PatchEmbed((patch_size,) * 3, in_chans, embed_dim)
        self.eva = Eva(embed_dim=embed_dim, depth=depth, num_heads=num_heads, ref_feat_shape=self.grid,
                       mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, init_values=init_values,
                       scale_attn_inner=scale_attn_inner, use_abs_pos_emb=True, use_rot_pos_emb=True)
        self.down_projection.apply(InitWeights_He(1e-2))  # as Primus initialises it; Eva inits itself

    @property
    def blocks(self) -> nn.ModuleList:
        return self.eva.blocks

    def forward(self, x: torch.Tensor, visible_indices: torch.Tensor | None = None):
        """x [B, C, H, W, D]; visible_indices [B, n_vis] token ids to keep (in that order), or None for all.

        Returns (normed output [B, n, dim], list of every block's raw output [B, n, dim])."""
        tokens = self.down_projection(x).flatten(2).transpose(1, 2) + self.eva.pos_embed  # B, N, dim (h-major)
        rope = self.eva.rope.get_embed()  # N, rope channels
        if visible_indices is not None:
            tokens = torch.gather(tokens, 1, visible_indices[..., None].expand(-1, -1, tokens.shape[-1]))
            rope = apply_keep_indices_nlc(tokens, rope, visible_indices)[:, None]  # B, 1 (heads), n_vis, rope ch.
        x, hidden_states = self.eva.pos_drop(tokens), []
        for block in self.eva.blocks:
            x = block(x, rope=rope)
            hidden_states.append(x)
        return self.eva.norm(x), hidden_states
