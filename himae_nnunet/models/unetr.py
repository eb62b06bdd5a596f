"""UNETR (Hatamizadeh et al. 2022) around our 3D ViT, built the way nnU-Net builds networks from plans.

    nnU-Net: cls(input_channels=, num_classes=, deep_supervision=, **arch_kwargs)

The encoder is the very `ViTEncoder3D` of pretraining (same state-dict keys under `encoder.`). Skips come
from the raw outputs of blocks 3, 6, 9 and the final normed output. Unlike the authors' UNETR (fixed 96^3,
trilinear last stage for p = 12), the patch factor p is split into four upsampling factors, e.g.
16 = 2*2*2*2, 12 = 3*2*2*1, 8 = 2*2*2*1, so any input whose axes are multiples of p works.
"""
import torch
from torch import nn

from himae_nnunet.core.errors import UserError
from himae_nnunet.models.presets import model_config
from himae_nnunet.models.vit import ViTEncoder3D


OUR_TRAINERS = ("nnUNetTrainerHiEndMAE (pretrained encoder), nnUNetTrainerUNETR (from scratch) or "
                "nnUNetTrainerUNETRPretrainedWeights (with -pretrained_weights)")


def refuse_stock_trainer(what: str):
    """nnU-Net's CNN trainers would train (or fail on) a UNETR with their deep supervision and SGD settings."""
    raise UserError(f"{what}: our UNETR has no deep supervision and trains only with our trainers: -tr "
                    f"{OUR_TRAINERS}, found through `export nnUNet_extTrainer=$(himae-nnunet ext-trainer-path)`. "
                    f"nnU-Net's own trainers (nnUNetTrainer, nnUNetTrainerNoDeepSupervision, ...) need the "
                    f"dataset's own plans (-p nnUNetPlans)")


def upsampling_factors(p: int) -> tuple[int, int, int, int]:
    """Four integer factors with product p, largest first (deepest stage first)."""
    factors = []
    n = p
    for f in (2, 3, 5, 7):
        while n % f == 0:
            factors.append(f)
            n //= f
    if n > 1 or len(factors) > 4:
        raise ValueError(f"patch size {p} cannot be split into at most four small upsampling factors")
    factors = sorted(factors, reverse=True) + [1] * (4 - len(factors))
    return tuple(factors)


class ResBlock(nn.Module):
    """conv3-IN-lrelu-conv3-IN + (1x1 conv-IN) residual, lrelu (MONAI's UnetResBlock)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = None if cin == cout else nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False),
                                                           nn.InstanceNorm3d(cout, affine=True))

    def forward(self, x):
        residual = x if self.skip is None else self.skip(x)
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)) + residual)


def up(cin: int, cout: int, f: int) -> nn.Module:
    return nn.ConvTranspose3d(cin, cout, kernel_size=f, stride=f, bias=False)


class TokenUpsampler(nn.Module):
    """A tap's tokens -> feature map upsampled by prod(factors): transposed conv, then (up + ResBlock) each."""

    def __init__(self, dim: int, cout: int, factors: tuple[int, ...]):
        super().__init__()
        self.first = up(dim, cout, factors[0])
        self.stages = nn.ModuleList(nn.Sequential(up(cout, cout, f), ResBlock(cout, cout)) for f in factors[1:])

    def forward(self, x):
        x = self.first(x)
        for stage in self.stages:
            x = stage(x)
        return x


class UpBlock(nn.Module):
    """Upsample the deeper features, concatenate the skip, ResBlock."""

    def __init__(self, cin: int, cout: int, f: int):
        super().__init__()
        self.up = up(cin, cout, f)
        self.block = ResBlock(2 * cout, cout)

    def forward(self, x, skip):
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNETRDecoder(nn.Module):
    def __init__(self, dim: int, in_chans: int, feature_size: int, factors, num_classes: int):
        super().__init__()
        fs = feature_size
        f1, f2, f3, f4 = factors
        self.skip_input = ResBlock(in_chans, fs)  # full resolution
        self.skip_tap0 = TokenUpsampler(dim, 2 * fs, (f1, f2, f3))  # block 3
        self.skip_tap1 = TokenUpsampler(dim, 4 * fs, (f1, f2))  # block 6
        self.skip_tap2 = TokenUpsampler(dim, 8 * fs, (f1,))  # block 9
        self.up4 = UpBlock(dim, 8 * fs, f1)
        self.up3 = UpBlock(8 * fs, 4 * fs, f2)
        self.up2 = UpBlock(4 * fs, 2 * fs, f3)
        self.up1 = UpBlock(2 * fs, fs, f4)
        self.seg_layers = nn.Conv3d(fs, num_classes, 1)  # name kept: nnU-Net skips '.seg_layers.' keys

    @property
    def deep_supervision(self) -> bool:
        return False  # UNETR has none

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool):
        refuse_stock_trainer("a stock nnU-Net trainer set decoder.deep_supervision")  # ours never do


class UNETR(nn.Module):
    """Segmentation network. arch_kwargs: a model config (preset or fields) plus `feature_size`.

    The encoder is built for the token grid of the *actual* patch size given as `patch_size_voxels`."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 preset: str | None = "vit_tiny", patch_size_voxels=(96, 96, 96), feature_size: int = 32,
                 keep_cls_token: bool = True, pos_embed: str = "sincos", **model_kwargs):
        if deep_supervision:  # nnU-Net's CNN trainers ask for it
            refuse_stock_trainer("UNETR(deep_supervision=True)")
        super().__init__()
        model_kwargs.pop("crop_size", None)
        cfg = model_config(preset, in_chans=input_channels, crop_size=tuple(patch_size_voxels),
                           pos_embed=pos_embed, **model_kwargs)
        self.config = cfg
        p, dim = cfg["patch_size"], cfg["embed_dim"]
        self.grid = tuple(s // p for s in cfg["crop_size"])
        self.taps = tuple(sorted(cfg["taps"]))
        self.keep_cls_token = keep_cls_token
        self.encoder = ViTEncoder3D(p, dim, cfg["depth"], cfg["num_heads"], self.grid, input_channels,
                                    cfg["mlp_ratio"], pos_embed)
        if not keep_cls_token:  # unused without the cls token: no such parameter (DDP rejects unused ones)
            self.encoder.cls_token = None
        self.decoder = UNETRDecoder(dim, input_channels, feature_size, upsampling_factors(p), num_classes)

    def tokens_to_map(self, t: torch.Tensor) -> torch.Tensor:
        """[B, (1) + N, D] -> [B, D, gh, gw, gd] (cls dropped)."""
        t = t[:, 1:] if self.keep_cls_token else t
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)

    def encode(self, x: torch.Tensor):
        """(final normed tokens, raw block outputs), cls token included when `keep_cls_token`."""
        enc = self.encoder
        if self.keep_cls_token:
            return enc(x)
        tokens = enc.patch_embed(x) + enc.pos_embed  # the authors' variant: no cls token at fine-tuning
        hidden = []
        for block in enc.blocks:
            tokens = block(tokens)
            hidden.append(tokens)
        return enc.norm(tokens), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != tuple(self.config["crop_size"]):
            raise ValueError(f"UNETR was built for input {self.config['crop_size']}, got {tuple(x.shape[2:])}")
        final, hidden = self.encode(x)
        d = self.decoder
        t0, t1, t2 = (self.tokens_to_map(hidden[i]) for i in self.taps)
        y = d.up4(self.tokens_to_map(final), d.skip_tap2(t2))
        y = d.up3(y, d.skip_tap1(t1))
        y = d.up2(y, d.skip_tap0(t0))
        y = d.up1(y, d.skip_input(x))
        return d.seg_layers(y)
