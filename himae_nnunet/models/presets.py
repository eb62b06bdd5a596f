"""Model presets as data: one dict per named encoder, plus the validation every config goes through.

Two encoder kinds (`encoder`): "vit", our ViT (models/vit.py), and "primus", nnU-Net's Primus encoder built from
dynamic-network-architectures' own modules (models/primus.py). The three paper ViTs follow Tang et al. (Table of
variants in DESIGN section 1); the Primus sizes S/B/M/L are exactly the encoders nnU-Net's stock
`nnUNet_Primus_{S,B,M,L}_Trainer` build (so their `-pretrained_weights` load them); the small ones are ours, for
CPU tests, demos and small GPUs. Every config is a plain dict of ints, floats, strings and tuples so that it can
travel inside checkpoints and nnU-Net plans as JSON.
"""
from copy import deepcopy

from himae_nnunet.core.errors import UserError

# Fields every model config carries; `crop_size` is the pretraining crop (token grid = crop / patch).
DEFAULTS = dict(
    encoder="vit",  # "vit" or "primus"
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

# Primus (Wald et al. 2025): EVA blocks (SwiGLU MLP of ratio 8/3, rotary + learned absolute position, layer
# scale 0.1, normed attention output), patch 8; the S/B/M/L dims, depths and heads of nnU-Net's stock trainers.
PRIMUS_BLOCK = dict(encoder="primus", patch_size=8, mlp_ratio=4 * 2 / 3, pos_embed="learnable", init_values=0.1,
                    scale_attn_inner=True)


def primus(embed_dim: int, depth: int, num_heads: int, decoder_dim: int, decoder_heads: int) -> dict:
    """A Primus preset; taps at the paper's relative depths 1/4, 1/2, 3/4 (blocks 3, 6, 9 of 12)."""
    return dict(PRIMUS_BLOCK, embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_dim=decoder_dim,
                decoder_heads=decoder_heads, taps=(depth // 4, depth // 2, 3 * depth // 4))


PRESETS.update({
    "primus_tiny": primus(96, 8, 4, 48, 4),  # ours: CPU tests
    "primus_s": primus(396, 12, 6, 198, 6),
    "primus_b": primus(792, 12, 12, 396, 12),
    "primus_m": primus(864, 16, 12, 432, 12),
    "primus_l": primus(1056, 24, 16, 528, 16),
})
ENCODERS = ("vit", "primus")


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
    if cfg["encoder"] not in ENCODERS:
        raise ConfigError(f"encoder {cfg['encoder']!r}: choose one of {', '.join(ENCODERS)}")
    if cfg["encoder"] == "primus":
        validate_primus(cfg)
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


def validate_primus(cfg: dict) -> None:
    """What dynamic-network-architectures' Eva asserts, said as a config error: a learned absolute table and a
    rotary dimension (head dim / 1.5) that is a whole multiple of 4."""
    if cfg.get("pos_embed") != "learnable":
        raise ConfigError(f"pos_embed={cfg.get('pos_embed')!r}: the Primus encoder has a learned absolute position "
                          f"table (plus rotary embedding); use pos_embed 'learnable' (drop --pos-embed)")
    head = cfg["embed_dim"] / cfg["num_heads"]
    if head != int(head) or (head / 1.5) != int(head / 1.5) or int(head / 1.5) % 4:
        raise ConfigError(f"embed_dim {cfg['embed_dim']} / num_heads {cfg['num_heads']} = {head:g}: Primus' 3D "
                          f"rotary embedding needs a head dimension whose two thirds are a whole multiple of 4 "
                          f"(e.g. 24, 48, 66, 72)")
