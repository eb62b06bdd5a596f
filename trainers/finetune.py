"""nnU-Net trainers for ViT plans made by `himae-nnunet plan`.

nnUNetTrainerUNETR                   our UNETR from scratch (the baseline)
nnUNetTrainerHiEndMAE                the same network, encoder loaded from the checkpoint the plans name
nnUNetTrainerUNETRPretrainedWeights  the same network started from a full-network file given to stock
                                     `nnUNetv2_train -pretrained_weights` (`himae-nnunet export-pretrained`)

All: AdamW (no decay on biases, norms, cls token, position table), linear warmup then cosine (or poly) decay,
optional layer-wise LR decay and frozen-encoder warmup (encoder LR 0, so DDP sees no unused parameters),
gradient-norm clipping of the gradients that are applied, no deep supervision. Options come from the plans'
`himae.finetune` block, so the constructor keeps nnU-Net's exact signature. Inference rebuilds the network
with the static builder alone. Weights at the start of a fold come from exactly one source, and the trainer
name says which: a fold resumed by `--c` / `--val` holds every weight in its own checkpoint, so the pretraining
file is read (and must be unchanged) only when a fold starts from scratch.
"""
import re
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from torch import autocast
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import _LRScheduler

warnings.filterwarnings("ignore", message=".*torch.jit.interface.* is deprecated", category=FutureWarning)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.file_path_utilities import get_output_folder  # noqa: E402
from nnunetv2.utilities.helpers import dummy_context  # noqa: E402

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import cpu_threads_from_env
from himae_nnunet.core.optim import adamw, adamw_param_groups
from himae_nnunet.core.schedule import warmup_decay_factor
from himae_nnunet.vit_plans.checks import check_plans_checkpoint, check_plans_format, require_vit_plans
from himae_nnunet.vit_plans.planning import UNETR_CLASS
from himae_nnunet.vit_plans.weights import build_network_from_plans, load_pretrained_into

TRAINER_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def unwrap(network):
    mod = network.module if isinstance(network, DDP) else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


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


def check_batch_for_gpus(batch_size: int, world_size: int, plans_name: str) -> None:
    """DDP splits the plans' batch over the GPUs: each must get the same number of patches."""
    if world_size > 1 and batch_size % world_size:
        raise UserError(f"-num_gpus {world_size}: plans {plans_name!r} have batch size {batch_size}, which "
                        f"{world_size} GPUs cannot share evenly; re-run `himae-nnunet plan ... --batch-size "
                        f"{world_size * max(1, batch_size // world_size)} --overwrite` (a multiple of {world_size}: "
                        f"the batch is split over the GPUs; no new preprocessing needed)")


def applied_parameters(optimizer) -> list:
    """Parameters of the groups with a learning rate above 0 (frozen-encoder epochs leave the encoder out)."""
    return [p for g in optimizer.param_groups if g["lr"] > 0 for p in g["params"] if p.grad is not None]


def head_first(groups: list[dict]) -> list[dict]:
    """Decoder (head) groups first: nnU-Net logs and plots param_groups[0]['lr'] as the learning rate."""
    return sorted(groups, key=lambda g: (g.get("is_encoder", False), -g.get("lr_scale", 1.0)))


def first_encoder_weight(network) -> torch.Tensor:
    return unwrap(network).encoder.patch_embed.proj.weight.detach().clone()


class nnUNetTrainerUNETR(nnUNetTrainer):
    """UNETR from scratch on ViT plans (the baseline)."""
    EPOCHS: int | None = None  # variants set these
    ITERATIONS: int | None = None
    VAL_ITERATIONS: int | None = None
    WEIGHTS_FROM_FILE = False  # True: started by stock -pretrained_weights (and only then)
    STARTS_FROM = "random initialization"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        opts = require_vit_plans(plans, configuration, type(self).__name__)  # before nnU-Net creates any folder
        if dist.is_available() and dist.is_initialized():
            check_batch_for_gpus(plans["configurations"][configuration]["batch_size"], dist.get_world_size(),
                                 plans["plans_name"])
        self.before_output_folder(plans, configuration, fold)
        super().__init__(plans, configuration, fold, dataset_json, device)
        cpu_threads_from_env(self.device)
        self.finetune = opts
        self.resumed = False  # set by load_checkpoint (--c, --val, --val_best)
        self.start_weight = None  # encoder patch-embedding weight after initialize, to see -pretrained_weights
        self.initial_lr = float(opts["initial_lr"])
        self.weight_decay = float(opts["weight_decay"])
        self.enable_deep_supervision = False
        self.num_epochs = int(self.EPOCHS or opts["num_epochs"] or self.num_epochs)
        self.num_iterations_per_epoch = int(self.ITERATIONS or opts["iterations_per_epoch"]
                                            or self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(self.VAL_ITERATIONS or opts["val_iterations_per_epoch"]
                                                or self.num_val_iterations_per_epoch)

    def before_output_folder(self, plans: dict, configuration: str, fold) -> None:
        """Checks to make before nnU-Net creates the fold's folder (subclasses)."""

    def fold_has_checkpoint(self, plans: dict, configuration: str, fold) -> bool:
        folder = get_output_folder(plans["dataset_name"], type(self).__name__, plans["plans_name"], configuration,
                                   fold)
        return any((Path(folder) / name).is_file() for name in TRAINER_CHECKPOINTS)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        if configuration_manager.network_arch_class_name != UNETR_CLASS:
            raise UserError(f"plans {plans_manager.plans_name!r} build {configuration_manager.network_arch_class_name}, "
                            f"not our UNETR; use plans written by `himae-nnunet plan`")
        check_plans_format(plans_manager.plans, "building the network")  # also at prediction
        return build_network_from_plans(configuration_manager.configuration, num_input_channels,
                                        num_output_channels)

    def initialize(self):
        super().initialize()
        if not self.resumed:
            self.load_start_weights()
        self.start_weight = first_encoder_weight(self.network)

    def load_start_weights(self) -> None:
        """Weights for a fold that starts from scratch (subclasses); random here."""

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self.resumed = True  # the fold's own checkpoint holds every weight: no pretraining file is read
        super().load_checkpoint(filename_or_checkpoint)

    def on_train_start(self):
        if not self.was_initialized:  # nnU-Net's on_train_start would; first, to check where weights came from
            self.initialize()
        if not self.resumed:
            self.check_weight_source()
        super().on_train_start()

    def check_weight_source(self) -> None:
        """Stock -pretrained_weights loads a file between initialize and training; refuse it unless this trainer
        is named for it, so its results never land in (and overwrite) another trainer's folder."""
        from_file = not torch.equal(first_encoder_weight(self.network), self.start_weight)
        if from_file and not self.WEIGHTS_FROM_FILE:
            raise UserError(f"-pretrained_weights replaced the weights {type(self).__name__} starts from "
                            f"({self.STARTS_FROM}), and its results folder is that run's. Train with -tr "
                            f"{pretrained_weights_trainer(type(self).__name__)} instead (a results folder of its own)")
        if not from_file and self.WEIGHTS_FROM_FILE:
            raise UserError(f"{type(self).__name__} starts from a full-network file: give -pretrained_weights FILE "
                            f"(written by `himae-nnunet export-pretrained`); from scratch, use -tr "
                            f"{type(self).__name__.replace('PretrainedWeights', '')}")

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.finetune["tta_mirroring"]:  # stored in the checkpoint: nnUNetv2_predict follows it
            self.inference_allowed_mirroring_axes = None
        return out

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # UNETR has a single output

    def configure_optimizers(self):
        o = self.finetune
        groups = head_first(param_groups(unwrap(self.network), self.weight_decay, float(o["layer_decay"])))
        optimizer = adamw(groups, self.device, lr=self.initial_lr, betas=tuple(o["betas"]))
        warmup = min(int(o["warmup_epochs"]), self.num_epochs // 10)
        self.print_to_log_file(f"AdamW lr {self.initial_lr}, weight decay {self.weight_decay}, warmup {warmup} "
                               f"epochs then {o['schedule']}, layer decay {o['layer_decay']}, encoder frozen for "
                               f"{o['freeze_encoder_epochs']} epochs, grad clip {o['grad_clip']} (logged LR: the "
                               f"decoder's)")
        scheduler = WarmupDecayLR(optimizer, self.initial_lr, self.num_epochs, warmup, o["schedule"],
                                  int(o["freeze_encoder_epochs"]))
        return optimizer, scheduler

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step with our clip norm (theirs is fixed at 12), over the gradients that are applied."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.loss(self.network(data), target)
        clip = float(self.finetune["grad_clip"])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(applied_parameters(self.optimizer), clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(applied_parameters(self.optimizer), clip)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}


def pretrained_weights_trainer(name: str) -> str:
    """The -pretrained_weights trainer of the same schedule: nnUNetTrainerUNETR_smoke ->
    nnUNetTrainerUNETRPretrainedWeights_smoke."""
    variant = name.partition("_")[2]
    return "nnUNetTrainerUNETRPretrainedWeights" + (f"_{variant}" if variant else "")


class nnUNetTrainerHiEndMAE(nnUNetTrainerUNETR):
    """UNETR whose encoder starts from the pretrained checkpoint named in the plans (`himae.checkpoint`)."""
    STARTS_FROM = "the pretrained encoder the plans name"
    check_checkpoint = staticmethod(check_plans_checkpoint)  # what a fold that starts from scratch checks

    def before_output_folder(self, plans: dict, configuration: str, fold) -> None:
        """A fold that starts from scratch: refuse a missing or changed checkpoint before any folder is made.
        A fold with a checkpoint of its own (--c, --val) needs no pretraining file."""
        self.pretrained = None
        if not self.fold_has_checkpoint(plans, configuration, fold):
            self.pretrained = check_plans_checkpoint(plans, configuration)

    def load_start_weights(self) -> None:
        plans = self.plans_manager.plans
        if self.pretrained is None:  # the fold had a checkpoint but starts again from scratch
            self.pretrained = check_plans_checkpoint(plans, self.configuration_name)
        path = plans["himae"]["checkpoint"]
        report = load_pretrained_into(unwrap(self.network), path, self.print_to_log_file, self.pretrained)
        self.pretrained = None  # free the file's tensors
        if self.local_rank == 0:  # every key, for audits
            save_json({"checkpoint": path, **report}, join(self.output_folder, "pretrained_weights.json"))


class nnUNetTrainerUNETRPretrainedWeights(nnUNetTrainerUNETR):
    """UNETR started from stock `-pretrained_weights FILE` (`himae-nnunet export-pretrained`): a results folder
    of its own, apart from the from-scratch baseline's."""
    WEIGHTS_FROM_FILE = True
    STARTS_FROM = "a full-network file"
