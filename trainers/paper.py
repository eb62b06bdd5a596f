"""The paper's fine-tuning protocol as nnU-Net trainers (the authors' downstream MONAI pipeline, on nnU-Net data).

nnUNetTrainerHiEndMAE_paper   pretrained encoder (the plans' checkpoint)
nnUNetTrainerUNETR_paper      the same network from scratch
_paper_oneshot / _1pct / _10pct / _100pct: the paper's 5000 / 5000 / 2000 / 1000 paper epochs; the plain
_paper trainers take `himae-nnunet plan --paper-epochs N` from the plans (default 1000).
_paper_smoke: 4 paper epochs in nnU-Net epochs of 2 iterations, 2 validation iterations (CPU checks only).

What they do, as the authors' code does it:
- a paper epoch is one iteration per training case (`--paper-epochs 5000` on one case = 5000 iterations);
  each iteration is 4 crops of ONE volume, volumes in a fresh random order every paper epoch;
- crop centres: each crop is foreground (uniform over label > 0 voxels) with p 1/2, else background inside
  the body (label 0, CT channel above TISSUE_THRESHOLD); crops are kept inside the body's bounding box;
- augmentation per crop: flip p 0.2 per axis, rot90 (k 1-3) in the axial plane p 0.2, intensity x(1 +- 0.1)
  p 0.1, +-0.1 p 0.1 (batchgeneratorsv2 transforms); nothing else (no nnU-Net spatial/intensity augmentation);
- loss: Dice (softmax, squared, background included, per sample and class, smooth 0 / 1e-6) + cross-entropy;
- AdamW lr 1e-4, betas (0.9, 0.999), weight decay 1e-5; LR 0 at paper epoch 0, linear to 1e-4 at paper epoch
  49, then cosine to 0 at the last paper epoch, changed per paper epoch; mixed precision on CUDA;
- the patch is the plans' (plan with `--patch-size 96 96 96` for the paper's 96^3; any other patch trains and
  predicts as planned, with a WARNING in the training log); sliding window with half-patch steps (overlap 0.5)
  and no test-time mirroring, at validation and in `nnUNetv2_predict` (stored in the checkpoint).
- plan options of the base trainers (lr, weight decay, warmup, schedule, layer decay, encoder freezing, grad
  clip, epochs, iterations per epoch, mirroring) are ignored; the log lists the ones that differ.

Remaining differences to the authors' code, all deliberate or imposed by nnU-Net:
- weight decay skips biases, norms, the cls token and position tables (theirs decays every parameter: a
  defect, see DESIGN.md);
- nnU-Net's preprocessing: resampling with its own interpolation (cubic in-plane), the CT window through
  CTNormalization, its nonzero crop; they resample with MONAI Spacingd (bilinear) to RAS and crop the image's
  foreground (CropForegroundd); our body box is the box of voxels above TISSUE_THRESHOLD;
- sliding-window tiles are blended with nnU-Net's Gaussian weights and its evenly spread tiles (theirs:
  MONAI's uniform weights, step 48); predictions are exported and evaluated at the original resolution with
  nnU-Net's evaluator (theirs: Dice with background, on the resampled, foreground-cropped volume);
- crops that reach past the volume are padded (air, background label) as nnU-Net does; MONAI would return
  smaller crops there (their network then fails);
- nnU-Net epochs group whole paper epochs (as many as fit in 250 iterations) for validation, logging and
  checkpoints; the pseudo-Dice validation uses 4 crops per iteration of the validation cases, sampled as above;
- with DDP each rank draws its own volume per iteration and a paper epoch is ceil(cases / ranks) iterations;
  the per-epoch visiting order holds per data-loading worker (nnU-Net's workers each keep their own order);
- no gradient clipping (as theirs); the UNETR is the plans' (ours by default; `himae-nnunet plan --unetr
  authors` where available for their topology; their network drops the cls token: plan with --drop-cls-token).
"""
import math

import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.optim import adamw
from himae_nnunet.trainers.finetune import nnUNetTrainerHiEndMAE, nnUNetTrainerUNETR, param_groups, unwrap
from himae_nnunet.trainers.paper_protocol import (CROPS_PER_VOLUME, DEFAULT_PAPER_EPOCHS, PAPER_PATCH,
                                                  PAPER_SCHEDULES, WARMUP_PAPER_EPOCHS, PaperCropLoader,
                                                  PaperDiceCELoss, PaperEpochLR, axial_axes,
                                                  paper_finetune_augmentation, paper_schedule)
from himae_nnunet.vit_plans.planning import FINETUNE_DEFAULTS

__all__ = ["nnUNetTrainerHiEndMAE_paper", "nnUNetTrainerUNETR_paper", "nnUNetTrainerHiEndMAE_paper_oneshot",
           "nnUNetTrainerHiEndMAE_paper_1pct", "nnUNetTrainerHiEndMAE_paper_10pct",
           "nnUNetTrainerHiEndMAE_paper_100pct", "nnUNetTrainerUNETR_paper_oneshot", "nnUNetTrainerUNETR_paper_1pct",
           "nnUNetTrainerUNETR_paper_10pct", "nnUNetTrainerUNETR_paper_100pct", "nnUNetTrainerHiEndMAE_paper_smoke",
           "nnUNetTrainerUNETR_paper_smoke"]

# the protocol's values of the base trainers' options (plans' himae.finetune); others are not used here
PAPER_OPTIONS = dict(initial_lr=1e-4, weight_decay=1e-5, betas=[0.9, 0.999], warmup_epochs=WARMUP_PAPER_EPOCHS,
                     schedule="cosine", layer_decay=1.0, freeze_encoder_epochs=0, grad_clip=math.inf,
                     tta_mirroring=False)
NOT_USED = ("num_epochs", "iterations_per_epoch")


class PaperProtocol:
    """Mixin for nnUNetTrainerUNETR / nnUNetTrainerHiEndMAE: see the module docstring."""
    PAPER_EPOCHS: int | None = None  # named variants fix it; else the plans' paper_epochs; else 1000
    MAX_ITERATIONS_PER_EPOCH = 250  # nnU-Net epochs group whole paper epochs up to this many iterations

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net's exact signature (it inspects it)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise UserError(f"{type(self).__name__}: the paper's protocol trains plain label maps; dataset.json "
                            f"of {self.plans_manager.dataset_name} has regions or an ignore label. Use "
                            f"nnUNetTrainerHiEndMAE (nnU-Net's losses handle both)")
        self.paper_epochs = int(self.PAPER_EPOCHS or self.finetune.get("paper_epochs") or DEFAULT_PAPER_EPOCHS)
        ignored = [f"{k}={self.finetune[k]}" for k in [*PAPER_OPTIONS, *NOT_USED]  # those the user set
                   if self.finetune.get(k) not in (FINETUNE_DEFAULTS.get(k), PAPER_OPTIONS.get(k))]
        self.finetune.update(PAPER_OPTIONS)
        self.initial_lr, self.weight_decay = PAPER_OPTIONS["initial_lr"], PAPER_OPTIONS["weight_decay"]
        self.iterations_per_paper_epoch = self.paper_epochs_per_epoch = None  # -> initialize (needs the split)
        self._epoch_seen, self._step_in_epoch = None, 0
        if ignored:
            self.print_to_log_file(f"the paper's protocol ignores these plans options: {', '.join(ignored)}")
        patch = tuple(self.configuration_manager.patch_size)
        if patch != PAPER_PATCH:
            self.print_to_log_file(f"WARNING: patch {list(patch)} from the plans is not the paper's "
                                   f"{list(PAPER_PATCH)}; training and prediction use {list(patch)}. For the "
                                   f"paper's protocol re-plan with `himae-nnunet plan ... --patch-size 96 96 96`")
        if self.configuration_manager.network_arch_init_kwargs.get("keep_cls_token") is True:
            self.print_to_log_file("note: the plans keep the cls token; the authors' UNETR drops it "
                                   "(`himae-nnunet plan --drop-cls-token`)")

    def initialize(self):
        tr_keys, _ = self.do_split()
        ranks = torch.distributed.get_world_size() if self.is_ddp else 1
        self.iterations_per_paper_epoch = math.ceil(len(tr_keys) / ranks)
        self.num_epochs, self.paper_epochs_per_epoch = paper_schedule(
            self.paper_epochs, self.iterations_per_paper_epoch, self.MAX_ITERATIONS_PER_EPOCH)
        self.num_iterations_per_epoch = self.paper_epochs_per_epoch * self.iterations_per_paper_epoch
        self.print_to_log_file(
            f"paper schedule: {self.paper_epochs} paper epochs x {self.iterations_per_paper_epoch} iterations "
            f"({len(tr_keys)} training cases{f' over {ranks} ranks' if ranks > 1 else ''}; 1 volume x "
            f"{CROPS_PER_VOLUME} crops each) = {self.paper_epochs * self.iterations_per_paper_epoch} iterations, "
            f"run as {self.num_epochs} nnU-Net epochs of {self.paper_epochs_per_epoch} paper epochs "
            f"({self.num_iterations_per_epoch} iterations)")
        super().initialize()

    def _set_batch_size_and_oversample(self):
        self.batch_size = CROPS_PER_VOLUME  # per rank: one volume, 4 crops
        self.oversample_foreground_percent = 0.5

    def _build_loss(self):
        return PaperDiceCELoss()

    def configure_optimizers(self):
        groups = param_groups(unwrap(self.network), self.weight_decay, layer_decay=1.0)
        optimizer = adamw(groups, self.device, lr=self.initial_lr, betas=tuple(PAPER_OPTIONS["betas"]))
        scheduler = PaperEpochLR(optimizer, self.initial_lr, self.paper_epochs, WARMUP_PAPER_EPOCHS,
                                 self.paper_epochs_per_epoch)
        self.print_to_log_file(f"AdamW lr {self.initial_lr}, weight decay {self.weight_decay} (not on biases, "
                               f"norms, tokens, position tables), warm-up {WARMUP_PAPER_EPOCHS} paper epochs from "
                               f"0 then cosine, no gradient clipping")
        return optimizer, scheduler

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        self.inference_allowed_mirroring_axes = None  # no test-time mirroring (stored in the checkpoint)
        patch = self.configuration_manager.patch_size
        return None, False, patch, None

    def get_dataloaders(self):
        """The paper's sampler and augmentation for training; the same sampler, unaugmented, for validation."""
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        _, _, patch, _ = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        ct = self.plans_manager.plans["himae"].get("ct_channels", [])
        if not ct:
            self.print_to_log_file("note: no CT channel, so background centres are any label-0 voxel")
        augment = paper_finetune_augmentation(patch, axial_axes(self.plans_manager.transpose_forward),
                                              warn=self.print_to_log_file)
        loaders = [PaperCropLoader(dataset, self.batch_size, patch, self.label_manager, transforms,
                                   tissue_channel=ct[0] if ct else None)
                   for dataset, transforms in zip(self.get_tr_and_val_datasets(),
                                                  (augment, ComposeTransforms([RemoveLabelTansform(-1, 0)])))]
        workers = get_allowed_n_proc_DA()
        if workers == 0:
            gens = [SingleThreadedAugmenter(dl, None) for dl in loaders]
        else:
            gens = [NonDetMultiThreadedAugmenter(data_loader=dl, transform=None, num_processes=n, num_cached=c,
                                                 seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)
                    for dl, n, c in zip(loaders, (workers, max(1, workers // 2)),
                                        (max(6, workers // 2), max(3, workers // 4)))]
        for gen in gens:
            next(gen)
        return gens[0], gens[1]

    def train_step(self, batch: dict) -> dict:
        if self._epoch_seen != self.current_epoch:  # also right after a resume
            self._epoch_seen, self._step_in_epoch = self.current_epoch, 0
        iteration = self.current_epoch * self.num_iterations_per_epoch + self._step_in_epoch
        self._step_in_epoch += 1
        self.lr_scheduler.step_paper_epoch(iteration // self.iterations_per_paper_epoch)
        return super().train_step(batch)


class nnUNetTrainerUNETR_paper(PaperProtocol, nnUNetTrainerUNETR):
    pass


class nnUNetTrainerHiEndMAE_paper(PaperProtocol, nnUNetTrainerHiEndMAE):
    pass


class nnUNetTrainerHiEndMAE_paper_oneshot(nnUNetTrainerHiEndMAE_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["one-shot"]


class nnUNetTrainerHiEndMAE_paper_1pct(nnUNetTrainerHiEndMAE_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["1%"]


class nnUNetTrainerHiEndMAE_paper_10pct(nnUNetTrainerHiEndMAE_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["10%"]


class nnUNetTrainerHiEndMAE_paper_100pct(nnUNetTrainerHiEndMAE_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["100%"]


class nnUNetTrainerUNETR_paper_oneshot(nnUNetTrainerUNETR_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["one-shot"]


class nnUNetTrainerUNETR_paper_1pct(nnUNetTrainerUNETR_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["1%"]


class nnUNetTrainerUNETR_paper_10pct(nnUNetTrainerUNETR_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["10%"]


class nnUNetTrainerUNETR_paper_100pct(nnUNetTrainerUNETR_paper):
    PAPER_EPOCHS = PAPER_SCHEDULES["100%"]


class nnUNetTrainerHiEndMAE_paper_smoke(nnUNetTrainerHiEndMAE_paper):
    PAPER_EPOCHS, MAX_ITERATIONS_PER_EPOCH, VAL_ITERATIONS = 4, 2, 2


class nnUNetTrainerUNETR_paper_smoke(nnUNetTrainerUNETR_paper):
    PAPER_EPOCHS, MAX_ITERATIONS_PER_EPOCH, VAL_ITERATIONS = 4, 2, 2
