"""nnU-Net's own trainers under a fine-tuning budget read from the plans, for matched comparisons and short runs.

`himae-nnunet compare` gives every arm the same iterations: our UNETR trainers read them from the plans'
`himae.finetune` block; the `_HimaeBudget` variants here read the same block, so nnU-Net's networks stay stock
(network, loss, optimizer, schedule, augmentation) except for epochs, iterations per epoch and test-time
mirroring (and, on CPU, torch's thread count follows OMP_NUM_THREADS, see core.nnunet_env):

- nnUNetTrainer_HimaeBudget: nnU-Net's CNN (SGD, poly LR, deep supervision) on a copy of its plans;
- nnUNet_Primus_{S,B,M,L}_Trainer_HimaeBudget: nnU-Net's stock Primus trainers (AdamW, 50 of 1000 epochs linear
  warmup, then poly), on the plans `himae-nnunet plan` writes for a Primus checkpoint. Their warmup keeps its
  share of the run (5 %, at least one epoch), else a short budget would be warmup only. They take
  `-pretrained_weights` as the stock trainers do. The stock trainers have no way to shorten a run (1000 x 250
  iterations are fixed in their constructors), hence these subclasses.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import (nnUNet_Primus_B_Trainer, nnUNet_Primus_L_Trainer,
                                                                    nnUNet_Primus_M_Trainer, nnUNet_Primus_S_Trainer)

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import cpu_threads_from_env

__all__ = ["nnUNetTrainer_HimaeBudget", "nnUNet_Primus_S_Trainer_HimaeBudget", "nnUNet_Primus_B_Trainer_HimaeBudget",
           "nnUNet_Primus_M_Trainer_HimaeBudget", "nnUNet_Primus_L_Trainer_HimaeBudget"]
BUDGET_KEYS = ("num_epochs", "iterations_per_epoch", "val_iterations_per_epoch", "tta_mirroring")
PRIMUS_WARMUP_SHARE = 50 / 1000  # the stock Primus trainers: 50 warmup epochs of 1000


def read_budget(plans: dict, trainer: str = "nnUNetTrainer_HimaeBudget") -> dict:
    block = plans.get("himae", {}).get("finetune", {})
    missing = [k for k in BUDGET_KEYS if block.get(k) is None]
    if missing:
        raise UserError(f"{trainer} needs plans whose himae.finetune block sets {', '.join(missing)} (plans "
                        f"{plans.get('plans_name')!r} do not); use the plans `himae-nnunet compare` writes, or "
                        f"`himae-nnunet plan ... --epochs E --iterations-per-epoch I --val-iterations-per-epoch V`")
    return {k: block[k] for k in BUDGET_KEYS}


class HimaeBudget:
    """Mixin before a stock trainer: epochs, iterations and test-time mirroring from the plans."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net's exact signature (it inspects it)
        budget = read_budget(plans, type(self).__name__)  # refuse before nnU-Net creates any folder
        super().__init__(plans, configuration, fold, dataset_json, device)
        cpu_threads_from_env(self.device)  # parallel comparison cells on CPU: one core each, not all of them
        self.num_epochs = int(budget["num_epochs"])
        self.num_iterations_per_epoch = int(budget["iterations_per_epoch"])
        self.num_val_iterations_per_epoch = int(budget["val_iterations_per_epoch"])
        self.tta_mirroring = bool(budget["tta_mirroring"])
        if hasattr(self, "warmup_duration_whole_net"):  # nnU-Net's warmup trainers (Primus)
            self.warmup_duration_whole_net = max(1, round(PRIMUS_WARMUP_SHARE * self.num_epochs))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.tta_mirroring:  # stored in the checkpoint: nnUNetv2_predict follows it
            self.inference_allowed_mirroring_axes = None
        return out


class nnUNetTrainer_HimaeBudget(HimaeBudget, nnUNetTrainer):
    pass


class nnUNet_Primus_S_Trainer_HimaeBudget(HimaeBudget, nnUNet_Primus_S_Trainer):
    pass


class nnUNet_Primus_B_Trainer_HimaeBudget(HimaeBudget, nnUNet_Primus_B_Trainer):
    pass


class nnUNet_Primus_M_Trainer_HimaeBudget(HimaeBudget, nnUNet_Primus_M_Trainer):
    pass


class nnUNet_Primus_L_Trainer_HimaeBudget(HimaeBudget, nnUNet_Primus_L_Trainer):
    pass
