"""Model presets as data: one dict per named ViT, plus the validation every config goes through.

The three paper variants follow Tang et al. (Table of variants in DESIGN section 1); the small ones are
ours, for CPU tests, demos and small GPUs. Every config is a plain dict of ints, floats, strings and
tuples so that it can travel inside checkpoints and nnU-Net plans as JSON.
"""
from copy import deepcopy

from himae_nnunet.core.errors import UserError

# Fields every model config carries; `crop_size` is the pretraining crop (token grid = crop / patch).
DEFAULTS = dict(
    in_chans=1,
    crop_size=(96, 96, 96),
    mlp_ratio=4.0,
    pos_embed="sincos",  # "sincos" (fixed) or "learnable" (normal, std 0.02)
    taps=(3, 6, 9),  # 0-based encoder blocks whose raw outputs feed the dense decoder and UNETR skips
    stages=3,  # B: cross-attention stages of the decoder (0 = MAE baseline)
    decoder_blocks=8,  # total decoder depth budget: 8 - 2B self blocks + B cross blocks
    mask_ratio=0.75,
)

PRESETS = {
    # name: patch, encoder dim / depth / heads, decoder dim / heads
    "vit_tiny": dict(patch_size=16, embed_dim=96, depth=12, num_heads=4, decoder_dim=48, decoder_heads=4),
    "vit_tiny_p8": dict(patch_size=8, embed_dim=96, depth=12, num_heads=4, decoder_dim=48, decoder_heads=4),  # 3 mm CPU runs
    "vit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_dim=192, decoder_heads=6),
    "vit_b16_768": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_dim=384, decoder_heads=12),
    "vit_b16_1536": dict(patch_size=16, embed_dim=1536, depth=12, num_heads=16, decoder_dim=528, decoder_heads=16),
    "vit_b12_1536": dict(patch_size=12, embed_dim=1536, depth=12, num_heads=16, decoder_dim=528, decoder_heads=16),
}


class ConfigError(UserError, ValueError):
    """A model configuration that cannot be built; the message says which field and what to do."""


def model_config(preset: str | None = None, **overrides) -> dict:
    """The full, validated config of a preset with `overrides` applied (None values are ignored)."""
    cfg = deepcopy(DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        cfg.update(PRESETS[preset])
    cfg["preset"] = preset
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(cfg["crop_size"], int):
        cfg["crop_size"] = (cfg["crop_size"],) * 3
    cfg["crop_size"] = tuple(int(c) for c in cfg["crop_size"])
    cfg["taps"] = tuple(int(t) for t in cfg["taps"])
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    missing = [k for k in ("patch_size", "embed_dim", "depth", "num_heads", "decoder_dim", "decoder_heads") if k not in cfg]
    if missing:
        raise ConfigError(f"model config lacks {', '.join(missing)}; start from a preset ({', '.join(PRESETS)})")
    p = cfg["patch_size"]
    for name, dim, heads in (("embed_dim", cfg["embed_dim"], cfg["num_heads"]),
                             ("decoder_dim", cfg["decoder_dim"], cfg["decoder_heads"])):
        if cfg.get("pos_embed", "sincos") == "sincos" and dim % 6:
            raise ConfigError(f"{name}={dim} is not divisible by 6, which the 3D sin-cos position embedding "
                              f"needs (D/6 frequencies per axis); use e.g. {dim - dim % 6 + 6}")
        if dim % heads:
            raise ConfigError(f"{name}={dim} is not divisible by its head count {heads}; pick dim and heads so "
                              f"that dim % heads == 0")
    bad = [c for c in cfg["crop_size"] if c % p or c <= 0]
    if bad:
        raise ConfigError(f"crop size {list(cfg['crop_size'])} is not a multiple of the ViT patch size {p} "
                          f"on every axis; use e.g. {[max(p, round(c / p) * p) for c in cfg['crop_size']]}")
    if not 0 <= cfg["stages"] <= len(cfg["taps"]):
        raise ConfigError(f"stages={cfg['stages']} must be between 0 and {len(cfg['taps'])} (one per encoder tap)")
    if cfg["decoder_blocks"] - 2 * cfg["stages"] < 0:
        raise ConfigError(f"decoder_blocks={cfg['decoder_blocks']} is too small for {cfg['stages']} dense stages")
    if any(not 0 <= t < cfg["depth"] - 1 for t in cfg["taps"]):
        raise ConfigError(f"taps {cfg['taps']} must be encoder blocks below the last one (depth {cfg['depth']})")
    if not 0.0 <= cfg["mask_ratio"] < 1.0:
        raise ConfigError(f"mask_ratio={cfg['mask_ratio']} must be in [0, 1)")
    n_tokens = (cfg["crop_size"][0] // p) * (cfg["crop_size"][1] // p) * (cfg["crop_size"][2] // p)
    if int(n_tokens * (1 - cfg["mask_ratio"])) < 1:
        raise ConfigError(f"mask_ratio={cfg['mask_ratio']} leaves no visible token of the {n_tokens} in a "
                          f"{list(cfg['crop_size'])} crop; use a larger crop or a smaller mask ratio")
    if cfg.get("pos_embed", "sincos") not in ("sincos", "learnable"):
        raise ConfigError(f"pos_embed={cfg['pos_embed']!r} must be 'sincos' or 'learnable'")
