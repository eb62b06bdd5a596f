"""Pretrained ViT weights into the UNETR of a fine-tuning run, with a report of every key.

Accepted files: our checkpoints (`himae-nnunet pretrain`, `import-official`) and, converted in memory, the
authors' released format. Only `encoder.*` is transferred. When the token grid differs from pretraining, a
sin-cos table is rebuilt for the new grid (the same positions keep the same code, as in pretraining) and a learned
table is resized trilinearly; the patch-embedding conv is adapted when the data have another channel
count. The file's decoder, mask token and projections are listed as skipped; the UNETR decoder starts at random.
`transfer_encoder_keys` is the one key walk, shared with the Primus export (vit_plans/primus_export.py), which
differs only in its key names and position-table rule.
"""
import json
import re
from collections import Counter
from pathlib import Path

import torch

from himae_nnunet.checkpoint.format import (CheckpointError, atomic_torch_save, is_ours, make_meta,
                                            require_readable_version, safe_torch_load, sha256)
from himae_nnunet.checkpoint.official import official_config_from_json, official_state_dict, official_weights
from himae_nnunet.models.unetr import UNETR
from himae_nnunet.models.vit import resize_pos_embed, sincos_pos_embed_3d

SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads")


def read_pretrained(path) -> tuple[dict, dict]:
    """(state dict, meta) of our checkpoint, or of an authors' one converted on the fly."""
    raw = safe_torch_load(path)
    if is_ours(raw):
        require_readable_version(raw, path)
        return raw["state_dict"], raw["meta"]
    if official_state_dict(raw, path) is None:
        raise CheckpointError(f"{path} is neither a himae-nnunet checkpoint nor an authors' Hi-End-MAE checkpoint "
                              f"(no 'format' field, no 'encoder_pos_embed' key)")
    beside = Path(path).with_name("config.json")  # the authors ship one; head counts are not in the shapes
    config = official_config_from_json(json.loads(beside.read_text())) if beside.is_file() else None
    ours, config, _ = official_weights(raw, path, config)
    return ours, make_meta(config, source=f"authors' checkpoint {Path(path).name}")


def describe(cfg: dict) -> str:
    name = cfg.get("preset") or "custom"
    return (f"{name} (patch {cfg['patch_size']}, dim {cfg['embed_dim']}, depth {cfg['depth']}, "
            f"heads {cfg['num_heads']})")


def check_same_encoder(ckpt_cfg: dict, net_cfg: dict, source) -> None:
    """Refuse a checkpoint whose encoder is another preset/shape than the one the plans build."""
    kinds = ckpt_cfg.get("encoder", "vit"), net_cfg.get("encoder", "vit")
    diff = [f"encoder {kinds[0]} vs {kinds[1]}"] if kinds[0] != kinds[1] else []
    diff += [f"{k} {ckpt_cfg[k]} vs {net_cfg[k]}" for k in SHAPE_FIELDS if int(ckpt_cfg[k]) != int(net_cfg[k])]
    if diff:
        raise CheckpointError(f"{source} holds a {describe(ckpt_cfg)} encoder but the plans build "
                              f"{describe(net_cfg)} ({'; '.join(diff)}); re-run `himae-nnunet plan` with this "
                              f"checkpoint, or give the checkpoint the plans were made for")


def adapt_input_channels(w: torch.Tensor, channels: int) -> torch.Tensor:
    """Patch-embedding conv [D, C_old, p, p, p] -> [D, channels, ...]: channel mean / channels, repeated, so a
    scan repeated over every channel gives the pretrained response."""
    return (w.sum(1, keepdim=True) / channels).repeat(1, channels, 1, 1, 1)


def transfer_encoder_keys(state_dict: dict, own: dict, network_key, pos_key: str, conv_key: str, position_table,
                          missing_note: str = "") -> tuple[dict, dict]:
    """(network key -> tensor, report) for the encoder tensors of a pretraining `state_dict` that fit `own` (the
    network's state dict). `network_key(file key)` names the network key (None: not an encoder tensor);
    `position_table(tensor)` gives the position table for the network's grid and a note, or (None, note) to keep
    the network's own; the input conv is adapted to the network's channels; any other shape mismatch is an error."""
    report = dict(loaded=[], resized=[], adapted=[], skipped=[], random=[])
    new = {}
    for key, v in state_dict.items():
        k = network_key(key)
        if k is None:
            report["skipped"].append(key)
        elif k not in own:
            report["skipped"].append(key + missing_note)
        elif k == pos_key and (v.shape != own[k].shape or position_table.network_fixed):
            table, note = position_table(v)
            if table is None:
                report["skipped"].append(f"{key} ({note})")
            else:
                new[k] = table
                report["resized"].append(f"{k} {note}")
        elif k == conv_key and v.shape[1] != own[k].shape[1]:
            new[k] = adapt_input_channels(v.float(), own[k].shape[1])
            report["adapted"].append(f"{k} input channels {v.shape[1]} -> {own[k].shape[1]}")
        elif v.shape != own[k].shape:
            raise CheckpointError(f"{key}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}; the checkpoint "
                                  f"does not fit the network")
        else:
            new[k] = v
            report["loaded"].append(k)
    fixed = {pos_key} if position_table.network_fixed else set()  # a fixed table is the network's own, not random
    report["random"] = [k for k in own if k not in new and k not in fixed]
    return new, report


def pretraining_grid(meta: dict) -> tuple[int, int, int]:
    p = int(meta["model"]["patch_size"])
    return tuple(int(c) // p for c in meta.get("crop_size", meta["model"]["crop_size"]))


class LearnedTable:
    """A learned position table resized trilinearly from the pretraining grid (when the grids differ)."""
    network_fixed = False  # True: the network keeps a fixed table of its own, whatever the file holds

    def __init__(self, old_grid, new_grid):
        self.old_grid, self.new_grid = tuple(old_grid), tuple(new_grid)

    def __call__(self, table: torch.Tensor):
        return (resize_pos_embed(table.float(), self.old_grid, self.new_grid),
                f"grid {self.old_grid} -> {self.new_grid} (learned table, trilinear)")


class UNETRTable(LearnedTable):
    """The UNETR's table: a fixed sin-cos one stays the network's own; a file's sin-cos table is rebuilt for the
    new grid (same positions, same code, as in pretraining); a learned one is resized."""

    def __init__(self, old_grid, new_grid, network_fixed: bool, file_sincos: bool):
        super().__init__(old_grid, new_grid)
        self.network_fixed, self.file_sincos = network_fixed, file_sincos

    def __call__(self, table: torch.Tensor):
        if self.network_fixed:
            return None, f"the network keeps its fixed sin-cos table for grid {self.new_grid}"
        if self.file_sincos:
            return (sincos_pos_embed_3d(table.shape[-1], self.new_grid)[None],
                    f"grid {self.old_grid} -> {self.new_grid} (fixed sin-cos table rebuilt)")
        return super().__call__(table)


def load_encoder(network, state_dict: dict, meta: dict) -> dict:
    """Copy the encoder of `state_dict` into `network` (a UNETR). Returns the report (lists of key notes)."""
    own = network.state_dict()
    table = UNETRTable(pretraining_grid(meta), network.grid,
                       network_fixed=getattr(network.encoder, "pos_embed_type", "sincos") == "sincos",
                       file_sincos=meta["model"].get("pos_embed") == "sincos")
    new, report = transfer_encoder_keys(
        state_dict, own, lambda k: k if k.startswith("encoder.") else None, "encoder.pos_embed",
        "encoder.patch_embed.proj.weight", table, missing_note=" (the network has none: cls token dropped)")
    result = network.load_state_dict({k: t.to(own[k].dtype) for k, t in new.items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return report


def summarize(keys: list[str]) -> list[str]:
    """Group keys by module, numbered indices collapsed: 'encoder.blocks.* (144 tensors)'."""
    counts = Counter()
    for k in keys:
        parts = re.sub(r"\.\d+(?=\.|$)", ".*", k.split(" (")[0]).split(".")
        head = parts[:3] if len(parts) > 2 and parts[2] == "*" else parts[:2]
        counts[".".join(head) + (".*" if len(parts) > len(head) else "")] += 1
    return [f"{k} ({n} tensor{'s' if n > 1 else ''})" for k, n in counts.items()]


def format_report(report: dict, source) -> list[str]:
    lines = [f"pretrained weights from {source}: {len(report['loaded'])} tensors loaded as they are, "
             f"{len(report['resized'])} resized, {len(report['adapted'])} adapted, {len(report['skipped'])} in the "
             f"file skipped, {len(report['random'])} network tensors initialised at random"]
    titles = dict(loaded="loaded", resized="resized", adapted="adapted", skipped="skipped (in the file, not used)",
                  random="random init (not in the file)")
    for key, title in titles.items():
        if report[key]:
            notes = [k for k in report[key] if " (" in k] if key == "skipped" else []
            plain = [k for k in report[key] if k not in notes]
            shown = report[key] if key in ("resized", "adapted") else summarize(plain) + notes
            lines.append(f"  {title}: " + "; ".join(shown))
    return lines


def load_pretrained_into(network, path, log=print, pretrained=None) -> dict:
    """Load the encoder of `path` (or of `pretrained` = its (state dict, meta), already read and checked) into
    `network`; log the report of every key."""
    state_dict, meta = pretrained if pretrained is not None else read_pretrained(path)
    check_same_encoder(meta["model"], network.config, path)
    report = load_encoder(network, state_dict, meta)
    for line in format_report(report, path):
        log(line)
    return report


def build_network_from_plans(cfg: dict, num_input_channels: int, num_output_channels: int) -> UNETR:
    """The UNETR of a plans configuration's architecture block (the trainers' static builder), in train
    mode; the sliding-window tile is the configuration's patch size."""
    kwargs = dict(cfg["architecture"]["arch_kwargs"], patch_size_voxels=tuple(cfg["patch_size"]))
    return UNETR(input_channels=num_input_channels, num_classes=num_output_channels, deep_supervision=False,
                 **kwargs)


def network_channels(plans: dict, dataset_json: dict, configuration: str) -> tuple[int, int]:
    """(input channels, output channels) nnU-Net builds for these plans and dataset."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return (determine_num_input_channels(pm, cm, dataset_json),
            pm.get_label_manager(dataset_json).num_segmentation_heads)


def export_full_network(plans: dict, dataset_json: dict, checkpoint, out, pretrained,
                        configuration: str = "3d_fullres", log=print) -> dict:
    """A file stock `nnUNetv2_train -pretrained_weights` accepts: every network key, encoder pretrained.
    `pretrained` = (state dict, meta) of `checkpoint`, already checked against the plans."""
    torch.manual_seed(0)
    network = build_network_from_plans(plans["configurations"][configuration],
                                       *network_channels(plans, dataset_json, configuration))
    report = load_pretrained_into(network, checkpoint, log=log, pretrained=pretrained)
    atomic_torch_save(out, {"network_weights": network.state_dict(),
                            "himae": {"checkpoint": str(Path(checkpoint).resolve()), "sha256": sha256(checkpoint),
                                      "plans_name": plans["plans_name"], "configuration": configuration}},
                      what="pretrained-weights file")
    return report
