"""The checks that tie ViT plans to what reads them: the plans' format, their fine-tuning options, and the
pretrained checkpoint they name (exists, unchanged, same encoder, spacing and window). One place, used by the
trainers (when a fold starts from scratch) and by `export-pretrained`."""
from pathlib import Path

from himae_nnunet.checkpoint.format import CheckpointError, sha256
from himae_nnunet.core.errors import UserError
from himae_nnunet.vit_plans.planning import (PLANS_FORMAT_VERSION, check_against_pretraining, finetune_options,
                                             is_primus_plans, is_vit_plans, planned_encoder)
from himae_nnunet.vit_plans.weights import check_same_encoder, read_pretrained


def check_plans_format(plans: dict, source: str) -> None:
    """Refuse plans whose `himae` block was written by a newer himae-nnunet than this one."""
    h = plans.get("himae", {})
    version = h.get("format_version")
    if not isinstance(version, int) or version > PLANS_FORMAT_VERSION:
        raise UserError(f"{source}: plans {plans.get('plans_name')!r} have himae.format_version {version!r} "
                        f"(written by himae-nnunet {h.get('package_version', 'unknown')}); this himae-nnunet reads "
                        f"format {PLANS_FORMAT_VERSION} or older: upgrade it (pip install -U himae-nnunet)")


def require_vit_plans(plans: dict, configuration: str, trainer: str) -> dict:
    """The plans' fine-tuning options, after checking the plans are ViT plans this package can read."""
    if not is_vit_plans(plans, configuration):
        arch = plans.get("configurations", {}).get(configuration, {}).get("architecture", {})
        if is_primus_plans(plans):
            raise UserError(f"{trainer}: plans {plans.get('plans_name')!r} are Primus plans (a Primus checkpoint); "
                            f"fine-tune them with nnU-Net's Primus trainers: `himae-nnunet export-pretrained "
                            f"--plans PLANS.json -o W.pth`, then `nnUNetv2_train ... -tr nnUNet_Primus_S_Trainer "
                            f"-p {plans.get('plans_name')} -pretrained_weights W.pth`")
        raise UserError(
            f"{trainer} needs ViT plans written by `himae-nnunet plan`, but plans {plans.get('plans_name')!r} "
            f"configuration {configuration!r} build {arch.get('network_class_name', 'no network')}. Run "
            f"`himae-nnunet plan DATASET --checkpoint CKPT` and train with `-p HiEndMAEPlans 3d_fullres`")
    check_plans_format(plans, trainer)
    return finetune_options(plans["himae"].get("finetune", {}), f"plans {plans['plans_name']!r} himae.finetune")


def check_unchanged(path: Path, expected_sha: str) -> None:
    """The file the plans name: present, and byte-identical to the one they were made from."""
    try:
        digest = sha256(path)
    except FileNotFoundError:
        raise CheckpointError(f"the pretrained checkpoint {path} named in the plans does not exist; restore "
                              f"it, or re-run `himae-nnunet plan` with the checkpoint you want") from None
    if digest != expected_sha:
        raise CheckpointError(f"{path} changed since the plans were made (sha256 {digest[:16]}... vs the "
                              f"plans' {expected_sha[:16]}...); re-run `himae-nnunet plan ... --overwrite` for the "
                              f"new file and preprocess again")


def check_plans_checkpoint(plans: dict, configuration: str, checkpoint=None) -> tuple[dict, dict]:
    """(state dict, meta) of the checkpoint the plans name, or of `checkpoint` given instead (then its sha256
    is not compared); refuses a missing or changed file or another encoder, warns (refuses when strict)
    about other spacing or window."""
    h = plans["himae"]
    path = Path(checkpoint or h["checkpoint"])
    if checkpoint is None or path.resolve() == Path(h["checkpoint"]).resolve():
        check_unchanged(path, h["checkpoint_sha256"])
    state_dict, meta = read_pretrained(path)
    cfg = plans["configurations"][configuration]
    check_same_encoder(meta["model"], planned_encoder(plans, configuration), path)
    spacing = [meta["spacing"][i] for i in plans["transpose_forward"]]
    check_against_pretraining("spacing", cfg["spacing"], spacing, h.get("strict", False))
    for c in h.get("ct_channels", []):
        props = plans["foreground_intensity_properties_per_channel"][str(c)]
        check_against_pretraining("intensity window", [props["percentile_00_5"], props["percentile_99_5"]],
                                  meta["intensity_window"], h.get("strict", False))
    return state_dict, meta
