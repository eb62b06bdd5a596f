"""nnU-Net's own CNN trainer under a fine-tuning budget read from the plans, for matched comparisons.

`himae-nnunet compare` gives every arm the same iterations: our UNETR trainers read them from the plans'
`himae.finetune` block; nnUNetTrainer_HimaeBudget reads the same block from a copy of nnU-Net's plans (same
network, same data folder), so nnU-Net's baseline stays stock (SGD, poly LR, deep supervision, its augmentation)
except for epochs, iterations per epoch and test-time mirroring.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from himae_nnunet.core.errors import UserError

BUDGET_KEYS = ("num_epochs", "iterations_per_epoch", "val_iterations_per_epoch", "tta_mirroring")


def read_budget(plans: dict) -> dict:
    block = plans.get("himae", {}).get("finetune", {})
    missing = [k for k in BUDGET_KEYS if block.get(k) is None]
    if missing:
        raise UserError(f"nnUNetTrainer_HimaeBudget needs plans whose himae.finetune block sets {', '.join(missing)} "
                        f"(plans {plans.get('plans_name')!r} do not); use the plans `himae-nnunet compare` writes")
    return {k: block[k] for k in BUDGET_KEYS}


class nnUNetTrainer_HimaeBudget(nnUNetTrainer):
    """nnUNetTrainer with epochs, iterations and test-time mirroring from the plans' himae.finetune block."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net's exact signature (it inspects it)
        budget = read_budget(plans)  # refuse before nnU-Net creates any folder
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(budget["num_epochs"])
        self.num_iterations_per_epoch = int(budget["iterations_per_epoch"])
        self.num_val_iterations_per_epoch = int(budget["val_iterations_per_epoch"])
        self.tta_mirroring = bool(budget["tta_mirroring"])

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.tta_mirroring:  # stored in the checkpoint: nnUNetv2_predict follows it
            self.inference_allowed_mirroring_axes = None
        return out
