"""nnU-Net trainers for ViT plans made by `himae-nnunet plan`.

nnUNetTrainerUNETR      our UNETR from scratch (the baseline)
nnUNetTrainerHiEndMAE   the same network, encoder loaded from the checkpoint the plans name

Both: AdamW (no decay on biases, norms, cls token, position table), linear warmup then cosine (or poly) decay,
optional layer-wise LR decay and frozen-encoder warmup (encoder LR 0, so DDP sees no unused parameters),
gradient-norm clipping, no deep supervision. Options come from the plans' `himae.finetune` block, so the
constructor keeps nnU-Net's exact signature. Inference rebuilds the network with the static builder alone.
"""
import re
import warnings

import torch
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from torch import autocast
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import _LRScheduler

warnings.filterwarnings("ignore", message=".*torch.jit.interface.* is deprecated", category=FutureWarning)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.helpers import dummy_context  # noqa: E402

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.optim import adamw_param_groups
from himae_nnunet.core.schedule import warmup_decay_factor
from himae_nnunet.vit_plans.planning import FINETUNE_DEFAULTS, UNETR_CLASS, check_against_pretraining, is_vit_plans


def unwrap(network):
    mod = network.module if isinstance(network, DDP) else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


def require_vit_plans(plans: dict, configuration: str, trainer: str) -> None:
    if not is_vit_plans(plans, configuration):
        arch = plans.get("configurations", {}).get(configuration, {}).get("architecture", {})
        raise UserError(
            f"{trainer} needs ViT plans written by `himae-nnunet plan`, but plans {plans.get('plans_name')!r} "
            f"configuration {configuration!r} build {arch.get('network_class_name', 'no network')}. Run "
            f"`himae-nnunet plan DATASET --checkpoint CKPT` and train with `-p HiEndMAEPlans 3d_fullres`")


def layer_id(name: str, depth: int) -> int:
    """0 for the patch embedding / cls / position table, i + 1 for encoder block i, depth + 1 otherwise."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return 0
    m = re.match(r"encoder\.blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_groups(network, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups by the shared no-decay rule (core.optim), split by layer; each carries lr_scale and
    whether it is encoder."""
    depth = len(network.encoder.blocks)

    def layer_fields(name: str) -> dict:
        return dict(lr_scale=layer_decay ** (depth + 1 - layer_id(name, depth)),
                    is_encoder=name.startswith("encoder."))
    return adamw_param_groups(network, weight_decay, layer_fields)


class WarmupDecayLR(_LRScheduler):
    """Per-epoch LR as nnU-Net steps it (`step(epoch)`): linear warmup, then cosine or poly to 0; each group's
    LR is scaled by its lr_scale, and encoder groups get 0 during the frozen-encoder epochs."""

    def __init__(self, optimizer, initial_lr: float, num_epochs: int, warmup_epochs: int, schedule: str = "cosine",
                 freeze_encoder_epochs: int = 0, current_step: int | None = None):
        if schedule not in ("cosine", "poly"):
            raise UserError(f"himae.finetune.schedule {schedule!r} must be 'cosine' or 'poly'")
        self.initial_lr, self.num_epochs, self.warmup = initial_lr, num_epochs, warmup_epochs
        self.schedule, self.freeze = schedule, freeze_encoder_epochs
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def factor(self, epoch: int) -> float:
        return warmup_decay_factor(epoch, self.num_epochs, self.warmup, decay=self.schedule)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.initial_lr * self.factor(current_step)
        for g in self.optimizer.param_groups:
            frozen = g.get("is_encoder", False) and current_step < self.freeze
            g["lr"] = 0.0 if frozen else lr * g.get("lr_scale", 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class nnUNetTrainerUNETR(nnUNetTrainer):
    """UNETR from scratch on ViT plans (the baseline)."""
    EPOCHS: int | None = None  # variants set these
    ITERATIONS: int | None = None
    VAL_ITERATIONS: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        require_vit_plans(plans, configuration, type(self).__name__)  # before nnU-Net creates any folder
        super().__init__(plans, configuration, fold, dataset_json, device)
        opts = {**FINETUNE_DEFAULTS, **self.plans_manager.plans["himae"].get("finetune", {})}
        self.finetune = opts
        self.initial_lr = float(opts["initial_lr"])
        self.weight_decay = float(opts["weight_decay"])
        self.enable_deep_supervision = False
        self.num_epochs = int(self.EPOCHS or opts["num_epochs"] or self.num_epochs)
        self.num_iterations_per_epoch = int(self.ITERATIONS or opts["iterations_per_epoch"]
                                            or self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(self.VAL_ITERATIONS or opts["val_iterations_per_epoch"]
                                                or self.num_val_iterations_per_epoch)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        from himae_nnunet.models.unetr import UNETR
        if configuration_manager.network_arch_class_name != UNETR_CLASS:
            raise UserError(f"plans {plans_manager.plans_name!r} build {configuration_manager.network_arch_class_name}, "
                            f"not our UNETR; use plans written by `himae-nnunet plan`")
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        kwargs["patch_size_voxels"] = tuple(configuration_manager.patch_size)  # the sliding-window tile
        return UNETR(num_input_channels, num_output_channels, deep_supervision=False, **kwargs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.finetune["tta_mirroring"]:  # stored in the checkpoint: nnUNetv2_predict follows it
            self.inference_allowed_mirroring_axes = None
        return out

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # UNETR has a single output

    def configure_optimizers(self):
        o = self.finetune
        groups = param_groups(unwrap(self.network), self.weight_decay, float(o["layer_decay"]))
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=tuple(o["betas"]),
                                      fused=self.device.type == "cuda")
        warmup = min(int(o["warmup_epochs"]), self.num_epochs // 10)
        self.print_to_log_file(f"AdamW lr {self.initial_lr}, weight decay {self.weight_decay}, warmup {warmup} "
                               f"epochs then {o['schedule']}, layer decay {o['layer_decay']}, encoder frozen for "
                               f"{o['freeze_encoder_epochs']} epochs, grad clip {o['grad_clip']}")
        scheduler = WarmupDecayLR(optimizer, self.initial_lr, self.num_epochs, warmup, o["schedule"],
                                  int(o["freeze_encoder_epochs"]))
        return optimizer, scheduler

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step with our clip norm (theirs is fixed at 12)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.loss(self.network(data), target)
        clip = float(self.finetune["grad_clip"])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}


class nnUNetTrainerHiEndMAE(nnUNetTrainerUNETR):
    """UNETR whose encoder starts from the pretrained checkpoint named in the plans (`himae.checkpoint`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        require_vit_plans(plans, configuration, type(self).__name__)
        self._pretrained = self.check_checkpoint(plans, configuration)  # refuse before any folder is made
        super().__init__(plans, configuration, fold, dataset_json, device)

    @staticmethod
    def check_checkpoint(plans: dict, configuration: str):
        """Read the plans' checkpoint; refuse a missing or changed file; compare spacing and window."""
        from himae_nnunet.checkpoint.format import CheckpointError, sha256
        from himae_nnunet.vit_plans.weights import check_same_encoder, read_pretrained
        h = plans["himae"]
        path = h["checkpoint"]
        try:
            digest = sha256(path)
        except FileNotFoundError:
            raise CheckpointError(f"the pretrained checkpoint {path} named in the plans does not exist; restore "
                                  f"it, or re-run `himae-nnunet plan` with the checkpoint you want") from None
        if digest != h["checkpoint_sha256"]:
            raise CheckpointError(f"{path} changed since the plans were made (sha256 {digest[:16]}... vs the "
                                  f"plans' {h['checkpoint_sha256'][:16]}...); re-run `himae-nnunet plan ... "
                                  f"--overwrite` for the new file and preprocess again")
        state_dict, meta = read_pretrained(path)
        cfg = plans["configurations"][configuration]
        check_same_encoder(meta["model"], cfg["architecture"]["arch_kwargs"], path)
        sp = [meta["spacing"][i] for i in plans["transpose_forward"]]
        check_against_pretraining("spacing", cfg["spacing"], sp, h.get("strict", False))
        for c in h.get("ct_channels", []):
            props = plans["foreground_intensity_properties_per_channel"][str(c)]
            check_against_pretraining("intensity window", [props["percentile_00_5"], props["percentile_99_5"]],
                                      meta["intensity_window"], h.get("strict", False))
        return state_dict, meta

    def initialize(self):
        super().initialize()
        from himae_nnunet.vit_plans.weights import load_pretrained_into
        h = self.plans_manager.plans["himae"]
        report = load_pretrained_into(unwrap(self.network), h["checkpoint"], None, self.print_to_log_file,
                                      self._pretrained)
        self._pretrained = None  # free the file's tensors
        if self.local_rank == 0:  # every key, for audits
            save_json({"checkpoint": h["checkpoint"], **report}, join(self.output_folder, "pretrained_weights.json"))
