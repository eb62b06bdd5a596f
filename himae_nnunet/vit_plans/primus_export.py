"""A pretrained Primus encoder inside the network of nnU-Net's stock Primus trainers, for `-pretrained_weights`.

The file holds every key of the network the trainer builds for the plans (nnU-Net's loader asserts each one, with
its shape): the patch embedding (`down_projection.*`) and the EVA encoder (`eva.*`) from pretraining, with the
absolute position table resized trilinearly from the pretraining grid to the plans' patch grid and the input conv
adapted to the data's channels; the patch decoder (`up_projection.*`) and the mask-token buffer keep the trainer's
own initialisation (seeded). The rotary embedding has no weights: the trainer builds it for its grid.
"""
from pathlib import Path

import torch

from himae_nnunet.checkpoint.format import CheckpointError, atomic_torch_save, sha256
from himae_nnunet.core.errors import UserError
from himae_nnunet.vit_plans.weights import (LearnedTable, format_report, network_channels, pretraining_grid,
                                           transfer_encoder_keys)

PRIMUS_TRAINERS = {"primus_s": "nnUNet_Primus_S_Trainer", "primus_b": "nnUNet_Primus_B_Trainer",
                   "primus_m": "nnUNet_Primus_M_Trainer", "primus_l": "nnUNet_Primus_L_Trainer"}
ENCODER_PREFIXES = ("down_projection.", "eva.")


def default_primus_trainer(encoder: dict) -> str:
    """The stock trainer whose network has this encoder's size (the size presets are theirs)."""
    name = PRIMUS_TRAINERS.get(encoder.get("preset"))
    if name is None:
        raise UserError(f"no stock nnU-Net Primus trainer builds a {encoder.get('preset') or 'custom'} encoder "
                        f"(dim {encoder['embed_dim']}, depth {encoder['depth']}); pretrain with --model "
                        f"{', '.join(PRIMUS_TRAINERS)} to fine-tune with {', '.join(PRIMUS_TRAINERS.values())}")
    return name


def primus_trainer_class(name: str):
    """A stock Primus trainer class (or our `_HimaeBudget` variant of one) by name."""
    from nnunetv2.training.nnUNetTrainer.primus import primus_trainers
    from himae_nnunet.trainers import budget
    cls = getattr(primus_trainers, name, None) or getattr(budget, name, None)
    if not isinstance(cls, type) or not issubclass(cls, primus_trainers.AbstractPrimus):
        raise UserError(f"--trainer {name}: not one of nnU-Net's Primus trainers; use e.g. "
                        f"{', '.join(PRIMUS_TRAINERS.values())} (or their _HimaeBudget variants)")
    return cls


def build_primus_network(plans: dict, dataset_json: dict, trainer: str, configuration: str):
    """The network `trainer` builds for these plans, in nnU-Net's own way, with its own initialisation."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    if any(s % 8 for s in cm.patch_size):
        raise UserError(f"plans {plans['plans_name']!r}: patch size {list(cm.patch_size)} is not a multiple of "
                        f"Primus' 8 on every axis; re-plan with `himae-nnunet plan --patch-size ...`")
    return primus_trainer_class(trainer).build_network_architecture(
        pm, cm, *network_channels(plans, dataset_json, configuration), enable_deep_supervision=False)


def check_same_primus(meta: dict, network, trainer: str, source) -> None:
    model, eva = meta["model"], network.eva
    mine = (model["embed_dim"], model["depth"], model["num_heads"], model["patch_size"])
    theirs = (eva.embed_dim, len(eva.blocks), eva.blocks[0].attn.num_heads, network.down_projection.proj.kernel_size[0])
    if model.get("encoder") != "primus" or mine != theirs:
        raise CheckpointError(f"{source} holds a {model.get('encoder', 'vit')} encoder (dim, depth, heads, patch "
                              f"{mine}) but {trainer} builds a Primus with {theirs}; pretrain the matching size "
                              f"(--model {', '.join(PRIMUS_TRAINERS)}) or choose the trainer of that size")


def primus_encoder_state(network, state_dict: dict, meta: dict, patch_size) -> tuple[dict, dict]:
    """(network keys -> pretrained tensors, report) from a Primus pretraining state dict; `patch_size` is the
    plans' (the trainer's token grid is patch_size / 8)."""
    new_grid = tuple(int(s) // int(meta["model"]["patch_size"]) for s in patch_size)

    def network_key(key: str) -> str | None:
        k = key[len("encoder."):] if key.startswith("encoder.") else ""
        return k if k.startswith(ENCODER_PREFIXES) else None
    return transfer_encoder_keys(state_dict, network.state_dict(), network_key, "eva.pos_embed",
                                 "down_projection.proj.weight", LearnedTable(pretraining_grid(meta), new_grid))


def export_primus_network(plans: dict, dataset_json: dict, checkpoint, out, pretrained, trainer: str,
                          configuration: str = "3d_fullres", log=print) -> dict:
    """Write `out` for `nnUNetv2_train ... -tr TRAINER -pretrained_weights out`; returns the key report.
    `pretrained` = (state dict, meta) of `checkpoint`, already checked against the plans."""
    state_dict, meta = pretrained
    torch.manual_seed(0)
    network = build_primus_network(plans, dataset_json, trainer, configuration)
    check_same_primus(meta, network, trainer, checkpoint)
    new, report = primus_encoder_state(network, state_dict, meta,
                                       plans["configurations"][configuration]["patch_size"])
    own = network.state_dict()
    network.load_state_dict({**own, **{k: t.to(own[k].dtype) for k, t in new.items()}}, strict=True)
    for line in format_report(report, checkpoint):
        log(line)
    atomic_torch_save(out, {"network_weights": network.state_dict(),
                            "himae": {"checkpoint": str(Path(checkpoint).resolve()), "sha256": sha256(checkpoint),
                                      "plans_name": plans["plans_name"], "configuration": configuration,
                                      "trainer": trainer, "pretrained_keys": sorted(new)}},
                      what="pretrained-weights file")
    return report
