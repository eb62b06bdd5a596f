"""UNETR (Hatamizadeh et al. 2022) around our 3D ViT, built the way nnU-Net builds networks from plans.

    nnU-Net: cls(input_channels=, num_classes=, deep_supervision=, **arch_kwargs)

The encoder is the very `ViTEncoder3D` of pretraining (same state-dict keys under `encoder.`). Skips come
from the raw outputs of blocks 3, 6, 9 and the final normed output. Two decoder topologies (`decoder=`):

- "authors": the authors' downstream UNETR (their MONAI UNETR, modified for p = 12): the token grid g goes
  g -> 2g -> 4g -> 8g with x2 transposed convolutions, then a trilinear resize to the input size and a 3x3
  convolution with bias; instance norms without affine parameters. Their code fixes the resize at 96^3;
  here it goes to the actual input size, so any input whose axes are multiples of p works (p >= 8).
- "ours": p is split into four integer upsampling factors, e.g. 16 = 2*2*2*2 (MONAI's standard UNETR),
  12 = 3*2*2*1, 8 = 2*2*2*1; affine instance norms. No interpolation, but for p = 12 the 2f stage already
  runs at full resolution.

`himae-nnunet plan` writes "authors" by default: it is the network the paper's numbers come from, and for
p = 12 the cheaper one (ViT-B/12 (1536), 96^3, feature size 32: 409 vs 979 decoder GMACs, 17.8 vs 38.3 M
decoder parameters; `benchmarks/unetr_decoders.py`); for p = 16 ours is MONAI's UNETR and 212 vs 259 GMACs.
Which fine-tunes better is not measured. Plans without a `decoder` field (made before the choice existed)
keep building "ours", so trained models reload.
`unetr_authors.py` converts the authors' own UNETR state dict into this class.
"""
import torch
from torch import nn

from himae_nnunet.core.errors import UserError
from himae_nnunet.models.presets import PRESETS, ConfigError, model_config
from himae_nnunet.models.vit import ViTEncoder3D

DECODERS = ("ours", "authors")


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

    def __init__(self, cin: int, cout: int, affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=affine)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(cout, affine=affine)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = None if cin == cout else nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False),
                                                           nn.InstanceNorm3d(cout, affine=affine))

    def forward(self, x):
        residual = x if self.skip is None else self.skip(x)
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)) + residual)


class TransposedUp(nn.ConvTranspose3d):
    """x f transposed convolution without bias; `size` is accepted (and implied) so that stages are uniform."""

    def __init__(self, cin: int, cout: int, f: int):
        super().__init__(cin, cout, kernel_size=f, stride=f, bias=False)

    def forward(self, x, size=None):
        return super().forward(x)


class ResizeConvUp(nn.Conv3d):
    """The authors' last stage: trilinear resize to `size` (align_corners False), then a 3x3 conv with bias."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding=1, bias=True)

    def forward(self, x, size=None):
        return super().forward(nn.functional.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False))


class TokenUpsampler(nn.Module):
    """A tap's tokens -> feature map upsampled by prod(factors): transposed conv, then (up + ResBlock) each."""

    def __init__(self, dim: int, cout: int, factors: tuple[int, ...], affine: bool = True):
        super().__init__()
        self.first = TransposedUp(dim, cout, factors[0])
        self.stages = nn.ModuleList(nn.Sequential(TransposedUp(cout, cout, f), ResBlock(cout, cout, affine))
                                    for f in factors[1:])

    def forward(self, x):
        x = self.first(x)
        for stage in self.stages:
            x = stage(x)
        return x


class UpBlock(nn.Module):
    """Upsample the deeper features to the skip's size, concatenate the skip, ResBlock."""

    def __init__(self, up: nn.Module, cout: int, affine: bool = True):
        super().__init__()
        self.up = up
        self.block = ResBlock(2 * cout, cout, affine)

    def forward(self, x, skip):
        return self.block(torch.cat([self.up(x, skip.shape[2:]), skip], dim=1))


class UNETRDecoder(nn.Module):
    """Skips from the input, the three taps and the final tokens, merged deepest first; `topology` in DECODERS."""

    def __init__(self, *, dim: int, in_chans: int, feature_size: int, num_classes: int, patch_size: int,
                 topology: str = "ours"):
        super().__init__()
        if topology not in DECODERS:
            raise ConfigError(f"decoder {topology!r} is not one of {', '.join(DECODERS)}")
        if topology == "authors" and patch_size < 8:
            raise ConfigError(f"the authors' UNETR decoder upsamples tokens 8x before resizing to the input; ViT "
                              f"patch size {patch_size} < 8 would shrink them; use decoder 'ours' (--unetr ours)")
        fs, affine = feature_size, topology == "ours"
        f1, f2, f3, f4 = upsampling_factors(patch_size) if topology == "ours" else (2, 2, 2, None)
        self.skip_input = ResBlock(in_chans, fs, affine)  # full resolution
        self.skip_tap0 = TokenUpsampler(dim, 2 * fs, (f1, f2, f3), affine)  # block 3
        self.skip_tap1 = TokenUpsampler(dim, 4 * fs, (f1, f2), affine)  # block 6
        self.skip_tap2 = TokenUpsampler(dim, 8 * fs, (f1,), affine)  # block 9
        self.up4 = UpBlock(TransposedUp(dim, 8 * fs, f1), 8 * fs, affine)
        self.up3 = UpBlock(TransposedUp(8 * fs, 4 * fs, f2), 4 * fs, affine)
        self.up2 = UpBlock(TransposedUp(4 * fs, 2 * fs, f3), 2 * fs, affine)
        last = TransposedUp(2 * fs, fs, f4) if topology == "ours" else ResizeConvUp(2 * fs, fs)
        self.up1 = UpBlock(last, fs, affine)
        self.seg_layers = nn.Conv3d(fs, num_classes, 1)  # name kept: nnU-Net skips '.seg_layers.' keys

    @property
    def deep_supervision(self) -> bool:
        return False  # UNETR has none

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool):
        refuse_stock_trainer("a stock nnU-Net trainer set decoder.deep_supervision")  # ours never do

    def forward(self, x: torch.Tensor, final: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """x [B, C, H, W, D] input; final [B, dim, *grid] last normed tokens; taps 3 x [B, dim, *grid],
        shallowest first. Returns logits [B, classes, H, W, D]."""
        t0, t1, t2 = taps
        y = self.up4(final, self.skip_tap2(t2))  # f1 * grid, 8 fs
        y = self.up3(y, self.skip_tap1(t1))  # f1 f2 * grid, 4 fs
        y = self.up2(y, self.skip_tap0(t0))  # f1 f2 f3 * grid, 2 fs
        y = self.up1(y, self.skip_input(x))  # H, W, D, fs
        return self.seg_layers(y)


class UNETR(nn.Module):
    """Segmentation network. arch_kwargs: a model config (preset or fields) plus `feature_size`, `decoder`
    (see the module docstring) and the encoder's LayerNorm `norm_eps`.

    The encoder is built for the token grid of the *actual* patch size given as `patch_size_voxels`."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 preset: str | None = "vit_tiny", patch_size_voxels=(96, 96, 96), feature_size: int = 32,
                 keep_cls_token: bool = True, pos_embed: str = "sincos", decoder: str = "ours",
                 norm_eps: float = 1e-6, **model_kwargs):
        if deep_supervision:  # nnU-Net's CNN trainers ask for it
            refuse_stock_trainer("UNETR(deep_supervision=True)")
        super().__init__()
        model_kwargs.pop("crop_size", None)
        kind = model_kwargs.get("encoder") or PRESETS.get(preset, {}).get("encoder", "vit")
        if kind != "vit":
            raise ConfigError(f"the UNETR is built around our ViT, not a {kind} encoder; fine-tune a Primus "
                              f"checkpoint with nnU-Net's Primus trainers (README: 'Primus')")
        cfg = model_config(preset, in_chans=input_channels, crop_size=tuple(patch_size_voxels),
                           pos_embed=pos_embed, **model_kwargs)
        self.config = cfg
        self.grid = tuple(s // cfg["patch_size"] for s in cfg["crop_size"])
        self.taps = tuple(sorted(cfg["taps"]))
        self.keep_cls_token = keep_cls_token
        self.encoder = ViTEncoder3D.from_config(cfg, self.grid, norm_eps=norm_eps)
        if not keep_cls_token:  # unused without the cls token: no such parameter (DDP rejects unused ones)
            self.encoder.cls_token = None
        self.decoder = UNETRDecoder(dim=cfg["embed_dim"], in_chans=input_channels, feature_size=feature_size,
                                    num_classes=num_classes, patch_size=cfg["patch_size"], topology=decoder)

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
        taps = [self.tokens_to_map(hidden[i]) for i in self.taps]
        return self.decoder(x, self.tokens_to_map(final), taps)
