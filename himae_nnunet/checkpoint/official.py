"""The authors' checkpoint format: config inference, key mapping, `import-official`."""
import re
from pathlib import Path

import torch

from himae_nnunet.checkpoint.format import (CheckpointError, load_strict, make_meta, safe_torch_load, save_checkpoint,
                                            sha256)
from himae_nnunet.models.hiend_mae import HiEndMAE
from himae_nnunet.models.presets import PRESETS, ConfigError, model_config
from himae_nnunet.models.vit import sincos_pos_embed_3d

def infer_official_config(sd: dict, num_heads: int | None = None, decoder_heads: int | None = None,
                          mask_ratio: float = 0.75) -> dict:
    """Model config from the shapes of an authors' state dict (prefix already stripped).

    Head counts are not visible in shapes: taken from the matching preset, or given."""
    try:
        embed_dim = sd["encoder.cls_token"].shape[-1]
        w = sd["encoder.patch_embed.proj.weight"]
        decoder_dim = sd["mask_token"].shape[-1]
        n_tokens = sd["encoder_pos_embed"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"not an authors' Hi-End-MAE checkpoint: key {e} is missing") from None
    p, in_chans = w.shape[-1], w.shape[1]
    depth = len({m.group(1) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))})
    self_blocks = len({m.group(1) for k in sd if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))})
    stages = len({m.group(1) for k in sd if (m := re.match(r"decoder\.cross_attention_blocks\.(\d+)\.", k))})
    side = round(n_tokens ** (1 / 3))
    if side ** 3 != n_tokens:
        raise CheckpointError(f"encoder_pos_embed has {n_tokens} tokens, not a cubic grid; cannot infer crop size")
    preset = next((n for n, c in PRESETS.items() if (c["patch_size"], c["embed_dim"], c["depth"], c["decoder_dim"])
                   == (p, embed_dim, depth, decoder_dim)), None)
    if preset is None and (num_heads is None or decoder_heads is None):
        raise CheckpointError(f"no preset matches patch {p}, dim {embed_dim}, depth {depth}, decoder dim "
                              f"{decoder_dim}; give --num-heads and --decoder-heads (or --config)")
    pos = "sincos" if torch.allclose(sd["encoder_pos_embed"][0].float(),
                                     sincos_pos_embed_3d(embed_dim, (side,) * 3), atol=1e-4) else "learnable"
    return model_config(preset, patch_size=p, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                        decoder_dim=decoder_dim, decoder_heads=decoder_heads, in_chans=in_chans,
                        crop_size=(side * p,) * 3, stages=stages, decoder_blocks=self_blocks + 2 * stages,
                        mask_ratio=mask_ratio, pos_embed=pos)


def official_key_to_ours(key: str, stages: int) -> str | None:
    """Our name for one key of the authors' state dict; None for keys we rebuild instead of loading."""
    key = key.removeprefix("module.")
    if key == "encoder_pos_embed":
        return "encoder.pos_embed"
    if key == "decoder_pos_embed":
        return None
    if m := re.match(r"encoder_to_decoder\.(\d+)\.(.*)", key):
        # theirs: [tap 3, tap 6, tap 9, final]; ours: [final, tap 9, tap 6, tap 3] (stage order)
        return f"encoder_to_decoder.{stages - int(m.group(1))}.{m.group(2)}"
    return key


def convert_official_state_dict(sd: dict, config: dict) -> tuple[dict, list[str]]:
    """Rename the authors' keys to ours. Returns (our state dict, notes on keys dropped or recomputed)."""
    out, notes = {}, []
    for k, v in sd.items():
        new = official_key_to_ours(k, config["stages"])
        if new is not None:
            out[new] = v
            continue
        grid = tuple(c // config["patch_size"] for c in config["crop_size"])
        gap = (v[0].float() - sincos_pos_embed_3d(config["decoder_dim"], grid)).abs().max().item()
        if gap <= 1e-4:
            notes.append(f"{k}: dropped (checked equal to the fixed sin-cos table the model rebuilds)")
        else:  # their code always builds (and freezes) the sin-cos table: this file was edited after training
            notes.append(f"WARNING {k}: dropped although it differs from the fixed sin-cos table by up to {gap:.3g}; "
                         f"the decoder (reconstruction, continued pretraining) uses the sin-cos table, the encoder "
                         f"(all that fine-tuning uses) is unaffected")
    return out, notes


def official_state_dict(raw, src) -> dict | None:
    """The authors' state dict inside a loaded file (bare, under 'state_dict' or 'model'; 'module.' kept), or
    None when the file is not in their layout."""
    sd = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else None
    if not isinstance(sd, dict) or not any(k.removeprefix("module.") == "encoder_pos_embed" for k in sd):
        return None
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{src}: expected a state dict (or a dict with 'state_dict') of tensors")
    return sd


def official_weights(raw, src, config: dict | None = None, num_heads=None, decoder_heads=None,
                     mask_ratio: float = 0.75) -> tuple[dict, dict, list[str]]:
    """(our state dict, model config, notes) of a loaded authors' file; config inferred from shapes if None."""
    sd = official_state_dict(raw, src)
    if sd is None:
        raise CheckpointError(f"{src} is not an authors' Hi-End-MAE checkpoint (no 'encoder_pos_embed' key)")
    if config is None:
        stripped = {k.removeprefix("module."): v for k, v in sd.items()}
        config = infer_official_config(stripped, num_heads, decoder_heads, mask_ratio)
    ours, notes = convert_official_state_dict(sd, config)
    return ours, config, notes


def import_official(src, out, config: dict | None = None, num_heads=None, decoder_heads=None,
                    mask_ratio: float = 0.75, overwrite: bool = False) -> tuple[dict, list[str]]:
    """Convert an authors' checkpoint file into ours. Returns (meta, notes). Refuses partial fits."""
    raw = safe_torch_load(src)
    ours, config, notes = official_weights(raw, src, config, num_heads, decoder_heads, mask_ratio)
    model = HiEndMAE(config)
    load_strict(model, ours, src)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another output path or delete it first")
    epoch = raw.get("epoch", 0) if isinstance(raw, dict) else 0
    meta = make_meta(model.config, step=int(epoch) if isinstance(epoch, (int, float)) else 0,
                     source=f"import-official {Path(src).name} (sha256 {sha256(src)[:16]})",
                     data=["authors' release (see their paper)"])
    save_checkpoint(out, model.state_dict(), meta)
    return meta, notes


def official_config_from_json(cfg: dict) -> dict:
    """Our config from the authors' config.json keys (img_size, enc_dim, enc_heads, ...)."""
    try:
        return model_config(None, patch_size=cfg["patch_size"], embed_dim=cfg["enc_dim"], depth=cfg["depth"],
                            num_heads=cfg["enc_heads"], decoder_dim=cfg["dec_dim"], decoder_heads=cfg["dec_heads"],
                            in_chans=cfg.get("in_chans", 1), crop_size=cfg["img_size"],
                            stages=cfg.get("cross_depth", 3),
                            decoder_blocks=cfg.get("self_depth", 2) + 2 * cfg.get("cross_depth", 3),
                            mask_ratio=cfg.get("mask_ratio", 0.75),
                            pos_embed={"sincos": "sincos"}.get(cfg.get("pos_embed_type", "sincos"), "learnable"))
    except KeyError as e:
        raise ConfigError(f"authors' config lacks {e}") from None
