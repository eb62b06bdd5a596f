"""ViT plans for nnU-Net: derived from a dataset's own plans and a pretrained checkpoint.

What changes against the base `3d_fullres` configuration: spacing and CT window from the checkpoint's meta
(the window through CTNormalization: clip to [lo, hi], subtract lo, divide by hi - lo gives [0, 1]), a patch
size that is a multiple of the ViT patch, the architecture (our UNETR with the checkpoint's encoder), a data
identifier of its own, and a top-level `himae` block naming the checkpoint (path, sha256) and the
fine-tuning options the trainers read. The base plans and their data are never written.

For a Primus checkpoint (`encoder: primus`) the plans keep nnU-Net's architecture block (the stock
`nnUNet_Primus_*_Trainer` build their network from the patch size alone) and the `himae` block records
`network: primus` and the encoder's sizes; everything else (spacing, window, patch a multiple of 8, data
identifier) is planned the same way.
"""
import json
import math
from copy import deepcopy
from pathlib import Path

from himae_nnunet.core.atomic import write_text_atomic
from himae_nnunet.checkpoint.format import package_version, sha256
from himae_nnunet.core.ct_plans import ensure_base_plans, set_ct_preprocessing
from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import CONFIGURATION, dataset_id, dataset_name, require_folder
from himae_nnunet.vit_plans.weights import read_pretrained

DEFAULT_PLANS_NAME = "HiEndMAEPlans"
DEFAULT_PRIMUS_PLANS_NAME = "HiEndMAEPrimusPlans"
BASE_PLANS_NAME = "nnUNetPlans"
UNETR_CLASS = "himae_nnunet.models.unetr.UNETR"
# `plan --unetr`: the decoder and what goes with it (models/unetr.py says why "authors" is the default)
UNETR_DEFAULTS = {"authors": dict(decoder="authors", keep_cls_token=False, norm_eps=1e-5),
                  "ours": dict(decoder="ours", keep_cls_token=True, norm_eps=1e-6)}
DEFAULT_UNETR = "authors"
PLANS_FORMAT_VERSION = 1  # of the `himae` block; trainers refuse newer plans
ENCODER_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "taps", "decoder_dim",
                  "decoder_heads")
# read by the trainers (trainers/finetune.py); users may edit them in the plans file
FINETUNE_DEFAULTS = dict(
    initial_lr=1e-4,  # paper: AdamW 1e-4
    weight_decay=1e-5,  # paper: 1e-5; not applied to biases, norms, cls token, position embedding
    betas=[0.9, 0.999],
    warmup_epochs=50,  # linear warmup, capped at a tenth of the run
    schedule="cosine",  # after warmup: "cosine" or "poly" (nnU-Net's exponent 0.9)
    layer_decay=1.0,  # layer-wise LR decay of the encoder (1.0 = off; e.g. 0.75)
    freeze_encoder_epochs=0,  # encoder LR held at 0 for this many first epochs (head warmup)
    grad_clip=1.0,  # gradient-norm clip (nnU-Net's CNN default is 12; Primus uses 1)
    num_epochs=None,  # None: nnU-Net's 1000, or the trainer variant's (_Xepochs, _smoke); a variant wins
    iterations_per_epoch=None,  # None: nnU-Net's 250
    val_iterations_per_epoch=None,  # None: nnU-Net's 50
    tta_mirroring=True,  # nnU-Net's 8x mirroring at validation/inference (False: one pass, e.g. on CPU)
    paper_epochs=None,  # _paper trainers: paper epochs (1 iteration per training case); None: 1000
)


def finetune_options(given: dict, source: str) -> dict:
    """FINETUNE_DEFAULTS updated with `given` (None values ignored); unknown keys are refused."""
    unknown = set(given) - set(FINETUNE_DEFAULTS)
    if unknown:
        raise UserError(f"{source}: unknown fine-tuning options {sorted(unknown)}; known: "
                        f"{', '.join(FINETUNE_DEFAULTS)}")
    return {**FINETUNE_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


def plans_path(dataset: str, plans_name: str) -> Path:
    return require_folder("nnUNet_preprocessed") / dataset / f"{plans_name}.json"


def load_plans(dataset: str, plans_name: str) -> dict:
    path = plans_path(dataset, plans_name)
    if not path.is_file():
        raise UserError(f"plans {path} do not exist; run `himae-nnunet plan {dataset} --checkpoint CKPT "
                        f"--plans-name {plans_name}` first")
    return json.loads(path.read_text())


def is_vit_plans(plans: dict, configuration: str = CONFIGURATION) -> bool:
    cfg = plans.get("configurations", {}).get(configuration, {})
    return cfg.get("architecture", {}).get("network_class_name") == UNETR_CLASS and "himae" in plans


def is_primus_plans(plans: dict) -> bool:
    return plans.get("himae", {}).get("network") == "primus"


def planned_encoder(plans: dict, configuration: str = CONFIGURATION) -> dict:
    """The encoder sizes the plans build: the UNETR's arch_kwargs, or the himae block's for Primus plans."""
    if is_primus_plans(plans):
        return plans["himae"]["encoder"]
    return plans["configurations"][configuration]["architecture"]["arch_kwargs"]


def unetr_architecture(model: dict, patch_size: list, feature_size: int, unetr: str, keep_cls_token,
                       learnable_pos_embed: bool) -> dict:
    return dict(network_class_name=UNETR_CLASS,
                arch_kwargs=dict(preset=model.get("preset"), patch_size_voxels=patch_size, feature_size=feature_size,
                                 **unetr_arch_kwargs(unetr, keep_cls_token),
                                 pos_embed="learnable" if learnable_pos_embed else "sincos",
                                 **{k: (list(model[k]) if isinstance(model[k], (list, tuple)) else model[k])
                                    for k in ENCODER_FIELDS}),
                _kw_requires_import=[])


def differs(a, b, tol: float = 1e-3) -> bool:
    return len(a) != len(b) or any(abs(float(x) - float(y)) > tol for x, y in zip(a, b))


def check_against_pretraining(what: str, used, pretrained, strict: bool, warn=print) -> None:
    """Warn (or refuse, when strict) if `used` (spacing or window) is not what the encoder was pretrained on."""
    if differs(used, pretrained):
        msg = (f"{what} {[float(v) for v in used]} differs from the pretraining {what} "
               f"{[float(v) for v in pretrained]}: the encoder sees other voxel sizes or intensities than it "
               f"learned from")
        if strict:
            raise UserError(msg + "; refused (strict). Use the pretraining value or drop --strict")
        warn("WARNING: " + msg)


def default_patch_size(crop, median_shape, p: int, max_tokens: int) -> list[int]:
    """The pretraining crop, grown by whole ViT patches along axes the median image fills, within max_tokens."""
    patch = [int(c) for c in crop]
    while True:
        room = [(m / s, i) for i, (s, m) in enumerate(zip(patch, median_shape)) if m >= s + p]
        if not room:
            return patch
        _, axis = max(room)
        grown = patch.copy()
        grown[axis] += p
        if math.prod(g // p for g in grown) > max_tokens:
            return patch
        patch = grown


def unetr_arch_kwargs(unetr: str, keep_cls_token: bool | None) -> dict:
    """The UNETR choice as arch_kwargs: "authors" = their decoder, no cls token, MONAI's LayerNorm eps 1e-5;
    "ours" = our decoder, cls token kept unless told otherwise, pretraining's eps 1e-6."""
    if unetr not in UNETR_DEFAULTS:
        raise UserError(f"--unetr {unetr!r}: choose one of {', '.join(UNETR_DEFAULTS)}")
    kwargs = dict(UNETR_DEFAULTS[unetr])
    if keep_cls_token is not None:
        kwargs["keep_cls_token"] = bool(keep_cls_token)
    return kwargs


def resolve_patch_size(patch_size, crop, median, p: int, max_tokens: int | None, warn) -> list[int]:
    """The fine-tuning patch: as given, or grown from the pretraining crop; a multiple of the ViT patch."""
    if patch_size is None:
        budget = max_tokens or 2 * math.prod(c // p for c in crop)
        patch_size = default_patch_size(crop, median, p, budget)
    patch_size = [int(s) for s in patch_size]
    if len(patch_size) != 3 or any(s <= 0 or s % p for s in patch_size):
        raise UserError(f"patch size {patch_size} is not a multiple of the ViT patch size {p} on every axis; "
                        f"use e.g. {[max(p, round(s / p) * p) for s in patch_size]}")
    if patch_size != crop:
        warn(f"note: patch size {patch_size} differs from the pretraining crop {crop}; the position embedding "
             f"is resized to the new token grid when the weights are loaded")
    return patch_size


def derive_vit_plans(base: dict, ckpt_path: str, meta: dict, sha: str, plans_name: str = DEFAULT_PLANS_NAME,
                     patch_size=None, batch_size: int = 2, feature_size: int = 32, keep_cls_token: bool | None = None,
                     learnable_pos_embed: bool = True, spacing=None, window=None, strict: bool = False,
                     max_tokens: int | None = None, finetune: dict | None = None, unetr: str = DEFAULT_UNETR,
                     warn=print) -> dict:
    """ViT plans (a new dict) from the dataset's base plans and a checkpoint's meta."""
    if CONFIGURATION not in base.get("configurations", {}):
        raise UserError(f"the base plans have no {CONFIGURATION} configuration: ViT plans need 3D images")
    model = meta["model"]
    p = int(model["patch_size"])
    transpose = base["transpose_forward"]
    pre_spacing = [float(s) for s in meta["spacing"]]
    pre_window = [float(w) for w in meta["intensity_window"]]
    spacing = [float(s) for s in spacing] if spacing is not None else [pre_spacing[i] for i in transpose]
    window = [float(w) for w in window] if window is not None else pre_window
    check_against_pretraining("spacing", spacing, [pre_spacing[i] for i in transpose], strict, warn)
    check_against_pretraining("intensity window", window, pre_window, strict, warn)
    if window[1] <= window[0]:
        raise UserError(f"intensity window {window} must be [low, high] with low < high")

    plans = deepcopy(base)
    plans["plans_name"] = plans_name
    cfg = deepcopy(base["configurations"][CONFIGURATION])
    for key in ("previous_stage", "next_stage", "inherits_from"):
        cfg.pop(key, None)
    median = [m * s / n for m, s, n in zip(cfg["median_image_size_in_voxels"], cfg["spacing"], spacing)]
    crop = [int(c) for c in meta.get("crop_size", model["crop_size"])]
    patch_size = resolve_patch_size(patch_size, crop, median, p, max_tokens, warn)
    primus = model.get("encoder", "vit") == "primus"
    cfg.update(patch_size=patch_size, median_image_size_in_voxels=[round(m, 1) for m in median],
               batch_size=int(batch_size))
    if not primus:
        cfg["architecture"] = unetr_architecture(model, patch_size, feature_size, unetr, keep_cls_token,
                                                 learnable_pos_embed)
    plans["configurations"] = {CONFIGURATION: cfg}
    ct_channels = [c for c, scheme in enumerate(cfg["normalization_schemes"]) if scheme == "CTNormalization"]
    if not ct_channels:
        warn(f"WARNING: no channel uses CTNormalization ({cfg['normalization_schemes']}); the encoder was "
             f"pretrained on CT scaled from the window {pre_window} and will see other intensities")
    set_ct_preprocessing(plans, CONFIGURATION, spacing, window, ct_channels)
    plans["himae"] = dict(
        format_version=PLANS_FORMAT_VERSION,
        package_version=package_version(),
        configuration=CONFIGURATION,
        checkpoint=str(Path(ckpt_path).resolve()),
        checkpoint_sha256=sha,
        pretrain={k: meta.get(k) for k in ("preset", "method", "stages", "step", "crop_size", "spacing",
                                           "intensity_window", "source")},
        intensity_window=window,
        ct_channels=ct_channels,
        strict=bool(strict),
        finetune=finetune_options(finetune or {}, "planning"),
    )
    if primus:
        plans["himae"].update(network="primus", encoder={k: model[k] for k in ("preset", "encoder", "patch_size",
                                                                              "embed_dim", "depth", "num_heads")})
    return plans


PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "preprocessor_name",
                      "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                      "resampling_fn_seg_kwargs")


def preprocessing_signature(plans: dict) -> str:
    """What nnU-Net's preprocessing reads from plans: equal signatures give identical data folders."""
    cfg = plans.get("configurations", {}).get(CONFIGURATION, {})
    return json.dumps([plans.get("transpose_forward"), plans.get("foreground_intensity_properties_per_channel"),
                       [cfg.get(k) for k in PREPROCESSING_KEYS]], sort_keys=True)


def sibling_plans(folder: Path, out: Path):
    """(file, plans) of the other plans files in a dataset's preprocessed folder."""
    for other in sorted(folder.glob("*.json")):
        try:
            plans = json.loads(other.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if other != out and isinstance(plans, dict) and isinstance(plans.get("configurations"), dict):
            yield other, plans


def choose_data_identifier(folder: Path, out: Path, plans: dict) -> str | None:
    """Reuse the data folder of other himae plans with the same preprocessing (e.g. the MAE and the Hi-End-MAE
    plans of one dataset); refuse another plans file's folder when its preprocessing differs. Returns the
    plans file shared with, if any."""
    cfg = plans["configurations"][CONFIGURATION]
    mine = preprocessing_signature(plans)
    for other, theirs in sibling_plans(folder, out):
        ident = theirs["configurations"].get(CONFIGURATION, {}).get("data_identifier")
        if "himae" in theirs and ident and preprocessing_signature(theirs) == mine:
            cfg["data_identifier"] = ident
            return other.name
    for other, theirs in sibling_plans(folder, out):
        if any(isinstance(c, dict) and c.get("data_identifier") == cfg["data_identifier"]
               for c in theirs["configurations"].values()):
            raise UserError(f"{other.name} already uses the data folder {cfg['data_identifier']} with other "
                            f"preprocessing; choose another --plans-name")
    return None


def write_plans(dataset: str, plans: dict, overwrite: bool = False) -> Path:
    """Write `plans` as <plans_name>.json; refuses to replace non-himae plans or reuse another's data folder
    unless its preprocessing is the same (then the folder is shared)."""
    folder = require_folder("nnUNet_preprocessed") / dataset
    out = folder / f"{plans['plans_name']}.json"
    shared = choose_data_identifier(folder, out, plans)
    if shared:
        print(f"note: same spacing, window and resampling as {shared}: sharing its data folder "
              f"{plans['configurations'][CONFIGURATION]['data_identifier']}")
    if out.is_file():
        old = json.loads(out.read_text())
        if "himae" not in old:
            raise UserError(f"{out} exists and was not written by himae-nnunet; choose another --plans-name "
                            f"(the dataset's own plans are never overwritten)")
        if old == json.loads(json.dumps(plans)):
            return out
        if not overwrite:
            raise UserError(f"{out} exists with other settings; pass --overwrite to replace it (then re-run "
                            f"preprocessing), or choose another --plans-name")
    write_text_atomic(out, json.dumps(plans, indent=4))
    return out


def check_plans_name(plans_name: str, base_plans: str) -> None:
    if plans_name == base_plans or plans_name == BASE_PLANS_NAME:
        raise UserError(f"--plans-name {plans_name} would replace nnU-Net's own plans; choose another name")
    if "__" in plans_name:
        raise UserError(f"--plans-name {plans_name!r} contains '__', which nnU-Net uses to split results folder "
                        f"names (TRAINER__PLANS__CONFIGURATION); use single '_' or '-'")
    if not plans_name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--plans-name {plans_name!r}: use letters, digits, '_' and '-' only")


def plan(dataset, checkpoint: str, plans_name: str | None = None, base_plans: str = BASE_PLANS_NAME,
         overwrite: bool = False, preprocess: bool = False, num_processes: int | None = None, warn=print,
         **options) -> Path:
    """The whole `himae-nnunet plan` command; returns the plans file written. num_processes None: nnU-Net's
    default (nnUNet_def_n_proc)."""
    from nnunetv2.configuration import default_num_processes
    num_processes = num_processes or default_num_processes
    name = dataset_name(dataset)
    _, meta = read_pretrained(checkpoint)
    if plans_name is None:
        plans_name = DEFAULT_PRIMUS_PLANS_NAME if meta["model"].get("encoder") == "primus" else DEFAULT_PLANS_NAME
    check_plans_name(plans_name, base_plans)
    base = ensure_base_plans(plans_path(name, base_plans).parent, base_plans, num_processes, verify=True)
    plans = derive_vit_plans(base, checkpoint, meta, sha256(checkpoint), plans_name, warn=warn, **options)
    out = write_plans(name, plans, overwrite)
    if preprocess and shared_data_ready(out, plans):
        print(f"note: {plans['configurations'][CONFIGURATION]['data_identifier']} already holds these settings' "
              f"preprocessed data; not preprocessing it again")
    elif preprocess:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nn_preprocess
        nn_preprocess([dataset_id(name)], plans_name, [CONFIGURATION], [num_processes])
    return out


def shared_data_ready(plans_file: Path, plans: dict) -> bool:
    """True when the plans use another plans file's data folder and it is already preprocessed."""
    ident = plans["configurations"][CONFIGURATION]["data_identifier"]
    return ident != f"{plans['plans_name']}_{CONFIGURATION}" and any((plans_file.parent / ident).glob("*.pkl"))
