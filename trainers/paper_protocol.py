"""The pieces of the authors' fine-tuning recipe (their downstream MONAI pipeline) rebuilt on nnU-Net's data:
the crop sampler, the augmentation, the loss, the learning-rate schedule and the schedule arithmetic.
The trainers that put them together are in trainers/paper.py."""
import math

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits
from torch.optim.lr_scheduler import LRScheduler

from himae_nnunet.core.errors import UserError
from himae_nnunet.pretrain.data import UniformShiftTransform

PAPER_PATCH = (96, 96, 96)
CROPS_PER_VOLUME = 4  # their batch: 1 volume x 4 crops
FOREGROUND_PROBABILITY = 0.5  # RandCropByPosNegLabeld(pos=1, neg=1): each crop independently
WARMUP_PAPER_EPOCHS = 50
# paper epochs of the paper's label budgets (Sec. 4, fine-tuning)
PAPER_SCHEDULES = {"one-shot": 5000, "1%": 5000, "10%": 2000, "100%": 1000}
DEFAULT_PAPER_EPOCHS = PAPER_SCHEDULES["100%"]
# "inside the body" in [0, 1] window units: above nnU-Net's cubic-resampling overshoot of air (up to ~1e-2
# near edges), i.e. about 4 HU above the window's lower bound; the authors' air is exactly 0 (threshold 0)
TISSUE_THRESHOLD = 1e-2


def parse_paper_epochs(text: str) -> int:
    """`5000`, or a setting of the paper: one-shot, 1%, 10%, 100%."""
    key = str(text).strip().lower().replace("oneshot", "one-shot")
    if key in PAPER_SCHEDULES:
        return PAPER_SCHEDULES[key]
    try:
        value = int(key)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"--paper-epochs {text!r}: give a positive number of paper epochs or one of "
                        + ", ".join(f"{k} ({v})" for k, v in PAPER_SCHEDULES.items()))
    return value


def paper_schedule(paper_epochs: int, iterations_per_paper_epoch: int, max_iterations_per_epoch: int = 250):
    """(nnU-Net epochs, paper epochs per nnU-Net epoch). An nnU-Net epoch holds whole paper epochs, as many as
    fit in max_iterations_per_epoch (at least one), so that validation, logging and checkpoints keep nnU-Net's
    rhythm; nnU-Net epochs x their iterations = paper_epochs x iterations_per_paper_epoch exactly."""
    if paper_epochs <= 0 or iterations_per_paper_epoch <= 0:
        raise UserError(f"paper epochs ({paper_epochs}) and training cases ({iterations_per_paper_epoch}) must "
                        f"be positive; check --paper-epochs and the fold's training cases in splits_final.json")
    fit = max(1, max_iterations_per_epoch // iterations_per_paper_epoch)
    per_epoch = max(d for d in range(1, min(fit, paper_epochs) + 1) if paper_epochs % d == 0)
    return paper_epochs // per_epoch, per_epoch


class PaperEpochLR(LRScheduler):
    """Their LinearWarmupCosineAnnealingLR, counted in paper epochs: LR 0 at paper epoch 0, linear to the peak
    at paper epoch warmup - 1, then half a cosine, 0.5 (1 + cos(pi (e - warmup) / (total - warmup))). nnU-Net
    calls step(its epoch) at each epoch start; the trainer calls step_paper_epoch(e) before every iteration."""

    def __init__(self, optimizer, initial_lr: float, paper_epochs: int, warmup_epochs: int,
                 paper_epochs_per_epoch: int):
        self.initial_lr, self.total, self.warmup = initial_lr, paper_epochs, warmup_epochs
        self.per_epoch = paper_epochs_per_epoch
        super().__init__(optimizer)

    def factor(self, paper_epoch: int) -> float:
        if paper_epoch < self.warmup:
            return paper_epoch / max(1, self.warmup - 1)
        t = min(1.0, (paper_epoch - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * t))

    def step_paper_epoch(self, paper_epoch: int) -> None:
        lr = self.initial_lr * self.factor(paper_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, epoch=None):  # nnU-Net's epoch (None once, from the constructor)
        self.step_paper_epoch(0 if epoch is None else int(epoch) * self.per_epoch)


class PaperDiceCELoss(torch.nn.Module):
    """MONAI's DiceCELoss as they configure it (to_onehot_y, softmax, squared_pred, smooth_nr 0, smooth_dr 1e-6,
    background included, Dice per sample and class then averaged) plus mean cross-entropy, weights 1 and 1."""

    def __init__(self, smooth_dr: float = 1e-6):
        super().__init__()
        self.smooth_dr = smooth_dr

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # (B, C, X, Y, Z); target (B, 1, X, Y, Z) label ids
        labels = target[:, 0].long()
        probs = torch.softmax(logits, 1)
        onehot = torch.zeros_like(probs).scatter_(1, labels[:, None], 1.0)
        axes = tuple(range(2, logits.ndim))
        intersection = (probs * onehot).sum(axes)  # (B, C)
        denominator = (probs * probs).sum(axes) + onehot.sum(axes)  # squared_pred: sum p^2 + sum g^2
        dice = 1 - 2 * intersection / (denominator + self.smooth_dr)
        return dice.mean() + torch.nn.functional.cross_entropy(logits, labels)


def axial_axes(transpose_forward) -> tuple[int, int]:
    """The two in-plane axes of the preprocessed arrays: nnU-Net reads (slice, row, column), then transposes."""
    slice_axis = list(transpose_forward).index(0)
    return tuple(a for a in range(3) if a != slice_axis)


def paper_finetune_augmentation(patch_size, in_plane: tuple[int, int], warn=print) -> ComposeTransforms:
    """Their RandFlipd x3 (p 0.2 each), RandRotate90d (p 0.2, k 1-3, axial plane), RandScaleIntensityd
    (x(1 + U(-0.1, 0.1)), p 0.1), RandShiftIntensityd (+U(-0.1, 0.1), p 0.1), in their order; then
    nnU-Net's padding label -1 becomes background."""
    # MirrorTransform flips each allowed axis with p 0.5, so p 0.4 around it flips with p 0.2
    transforms = [RandomTransform(MirrorTransform(allowed_axes=(axis,)), apply_probability=0.4) for axis in range(3)]
    if patch_size[in_plane[0]] == patch_size[in_plane[1]]:
        transforms.append(RandomTransform(Rot90Transform(1, (1, 2, 3), allowed_axes=set(in_plane)),
                                          apply_probability=0.2))
    else:
        warn(f"WARNING: patch {list(patch_size)} is not square in the axial plane (axes {in_plane}): no rot90")
    transforms += [RandomTransform(MultiplicativeBrightnessTransform((0.9, 1.1), synchronize_channels=True),
                                   apply_probability=0.1),
                   RandomTransform(UniformShiftTransform(0.1), apply_probability=0.1),
                   RemoveLabelTansform(-1, 0)]
    return ComposeTransforms(transforms)


def crop_start(centre: int, patch: int, lo: int, hi: int, size: int) -> int:
    """First voxel of a crop around `centre`, kept inside [lo, hi) (the body) or else the volume, as MONAI
    corrects centres; centred with padding when even the volume is smaller than the patch."""
    if hi - lo < patch:
        lo, hi = 0, size
    if hi - lo < patch:
        return lo - (patch - (hi - lo)) // 2
    return int(np.clip(centre - patch // 2, lo, hi - patch))


class PaperCropLoader(nnUNetDataLoader):
    """Batches of `crops` crops of ONE volume (their RandCropByPosNegLabeld(pos=1, neg=1, num_samples=4,
    image_threshold=0) after CropForegroundd): each centre is, with probability 1/2, a uniformly random
    foreground voxel (label > 0), else a uniformly random background voxel inside the body (label 0 and
    the tissue channel above TISSUE_THRESHOLD); crops stay inside the body's bounding box. Volumes come in a
    fresh random order every pass (their shuffled DataLoader). The batch also holds each crop's centre
    and first voxel, for checks."""

    def __init__(self, data, crops: int, patch_size, label_manager, transforms=None, tissue_channel: int | None = 0):
        super().__init__(data, crops, patch_size, patch_size, label_manager,
                         oversample_foreground_percent=FOREGROUND_PROBABILITY, transforms=transforms)
        self.tissue_channel = tissue_channel
        self._order = []
        self._stats = {}  # case -> (foreground classes, their voxel shares, body box lo, body box hi)

    def get_indices(self):
        if not self._order:
            self._order = list(np.random.permutation(len(self.indices)))
        return [self.indices[self._order.pop()]] * self.batch_size

    def case_stats(self, case: str, data: np.ndarray, seg: np.ndarray):
        if case not in self._stats:
            counts = np.bincount(np.clip(seg[0], 0, None).ravel())
            classes = np.flatnonzero(counts[1:]) + 1
            body = data[self.tissue_channel] > TISSUE_THRESHOLD if self.tissue_channel is not None \
                else np.ones(seg.shape[1:], bool)
            ranges = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
            lo = [int(r[0]) if r.size else 0 for r in ranges]
            hi = [int(r[-1]) + 1 if r.size else s for r, s in zip(ranges, seg.shape[1:])]
            self._stats[case] = (classes, counts[classes] / max(1, counts[classes].sum()), lo, hi)
        return self._stats[case]

    def background_centre(self, data, seg, lo, hi):
        """Uniform over label-0 voxels inside the body box whose tissue channel is above the threshold."""
        def matches(*index):
            ok = seg[0][index] == 0
            return ok & (data[self.tissue_channel][index] > TISSUE_THRESHOLD) if self.tissue_channel is not None \
                else ok
        for _ in range(16):  # rejection sampling: uniform over the matches and cheap when they are many
            cand = np.random.randint(lo, hi, size=(64, 3))
            hit = np.flatnonzero(matches(*cand.T))
            if hit.size:
                return cand[hit[0]]
        found = np.argwhere(matches(*(slice(a, b) for a, b in zip(lo, hi))))
        return found[np.random.randint(len(found))] + np.array(lo) if len(found) else None

    def foreground_centre(self, classes, shares, class_locations, seg):
        """A class by its voxel share, then one of nnU-Net's sampled voxels of it: uniform over all foreground."""
        if not classes.size:
            return None
        c = int(np.random.choice(classes, p=shares))
        locations = (class_locations or {}).get(c, [])
        if len(locations) == 0:
            locations = np.argwhere(seg[0] == c)
            return locations[np.random.randint(len(locations))]
        return np.asarray(locations[np.random.randint(len(locations))])[1:]

    def pick_centre(self, data, seg, properties, classes, shares, lo, hi):
        """Foreground with p 1/2, else background; either falls back to the other (as MONAI), then the middle."""
        kinds = (True, False) if np.random.uniform() < FOREGROUND_PROBABILITY else (False, True)
        for fg in kinds:
            centre = self.foreground_centre(classes, shares, properties.get("class_locations"), seg) if fg \
                else self.background_centre(data, seg, lo, hi)
            if centre is not None:  # inside the body box, as MONAI sees only the foreground-cropped image
                return np.clip(np.asarray(centre), lo, np.array(hi) - 1)
        return np.array([s // 2 for s in seg.shape[1:]])

    def generate_train_batch(self):
        case = self.get_indices()[0]
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            data, seg, _, properties = self._data.load_case(case)
            data, seg = np.asarray(data), np.asarray(seg)  # (C, X, Y, Z), (1, X, Y, Z)
            classes, shares, lo, hi = self.case_stats(case, data, seg)
            images, labels, centres, starts = [], [], [], []
            for _ in range(self.batch_size):
                centre = self.pick_centre(data, seg, properties, classes, shares, lo, hi)
                start = [crop_start(int(c), p, a, b, s) for c, p, a, b, s in
                         zip(centre, self.patch_size, lo, hi, seg.shape[1:])]
                bbox = [[s, s + p] for s, p in zip(start, self.patch_size)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                label = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                if self.transforms is not None:
                    out = self.transforms(image=image, segmentation=label)
                    image, label = out["image"], out["segmentation"]
                images.append(image)
                labels.append(label)
                centres.append(centre)
                starts.append(start)
        return {"data": torch.stack(images), "target": torch.stack(labels), "keys": [case] * self.batch_size,
                "centres": np.array(centres), "starts": np.array(starts)}
