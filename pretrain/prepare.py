"""Pretraining data preparation: pretraining plans derived from a dataset's nnU-Net plans, nnU-Net's own
preprocessing into nnUNet_preprocessed, and `import-scans` for unlabelled scans.

The dataset's existing plans and preprocessed folders are never modified: the pretraining plans are a copy
with their own `plans_name` (= file stem) and `data_identifier`. nnU-Net's steps run as the stock commands
(`nnUNetv2_extract_fingerprint`, `nnUNetv2_plan_experiment`, `nnUNetv2_preprocess`) in child processes, so
they see the current nnUNet_* environment variables (nnunetv2.paths reads them once, at import).
"""
import json
import os
import re
import shutil
from copy import deepcopy
from pathlib import Path

from himae_nnunet.core.atomic import write_text_atomic
from himae_nnunet.core.ct import DEFAULT_SPACING, DEFAULT_WINDOW
from himae_nnunet.core.ct_plans import ensure_base_plans, nnunet_command, set_ct_preprocessing
from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import CONFIGURATION, dataset_id, dataset_name, require_folder, require_free_dataset_id
from himae_nnunet.scans.imageio import check_ct_hu, find_scans, read_scan

PLANS_BASE_NAME = "nnUNetPlans_himaePretrain"
PLANS_KEY = "himae_pretrain"  # our block inside the plans JSON: spacing, window, source plans
BODY_THRESHOLD_HU = -500.0  # import-scans: voxels above it form the body mask written as labelsTr


def default_plans_name(spacing=DEFAULT_SPACING, window=DEFAULT_WINDOW) -> str:
    """`nnUNetPlans_himaePretrain`, with a suffix naming spacing and window when they are not the paper's."""
    if tuple(map(float, spacing)) == DEFAULT_SPACING and tuple(map(float, window)) == DEFAULT_WINDOW:
        return PLANS_BASE_NAME
    fmt = lambda v: f"{v:g}".replace("-", "m").replace(".", "p")  # noqa: E731
    return f"{PLANS_BASE_NAME}_sp{'x'.join(map(fmt, spacing))}_w{fmt(window[0])}to{fmt(window[1])}"


def check_settings(spacing, window, crop_size) -> None:
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise UserError(f"--spacing {list(spacing)}: give three positive voxel sizes in mm (z y x)")
    if len(window) != 2 or window[0] >= window[1]:
        raise UserError(f"--window {list(window)}: give LOW HIGH in HU with LOW < HIGH")
    if len(crop_size) != 3 or any(c <= 0 for c in crop_size):
        raise UserError(f"--crop-size {list(crop_size)}: give one or three positive sizes in voxels")


def pretrain_plans(base: dict, plans_name: str, spacing, window, crop_size, base_name: str) -> dict:
    """A copy of the dataset's plans for pretraining: one configuration at `spacing`, CT normalization set to
    map `window` (HU) to [0, 1], slice-axis interpolation (core/ct_plans.py), identity transpose (isotropic
    target, so every dataset keeps z, y, x)."""
    if CONFIGURATION not in base.get("configurations", {}):
        raise UserError(f"plans {base_name} have no {CONFIGURATION} configuration; re-plan the dataset with "
                        f"nnUNetv2_plan_experiment")
    lo, hi = map(float, window)
    plans = deepcopy(base)
    cfg = deepcopy(base["configurations"][CONFIGURATION])
    old_spacing = cfg["spacing"]
    old_median = cfg.get("median_image_size_in_voxels", [])
    old_order = [base.get("transpose_forward", [0, 1, 2]).index(i) for i in range(3)]  # z,y,x -> base axes
    if len(old_median) == 3 and len(old_spacing) == 3:
        cfg["median_image_size_in_voxels"] = [round(old_median[o] * old_spacing[o] / s)
                                              for o, s in zip(old_order, spacing)]
    cfg.update(normalization_schemes=["CTNormalization"], use_mask_for_norm=[False],
               patch_size=[int(c) for c in crop_size])  # patch size sets nnU-Net's blosc2 chunking
    plans.update(plans_name=plans_name, configurations={CONFIGURATION: cfg},
                 transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2])
    plans["foreground_intensity_properties_per_channel"] = {"0": {}}
    set_ct_preprocessing(plans, CONFIGURATION, spacing, window)
    plans[PLANS_KEY] = dict(spacing=[float(s) for s in spacing], window=[lo, hi], source_plans=base_name,
                            note="written by himae-nnunet prepare-pretrain; do not edit, re-run it instead")
    return plans


def raw_images(raw_folder: Path) -> dict:
    """{case: [image files]} of a raw nnU-Net dataset, as nnU-Net lists them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    ds_json = json.loads((raw_folder / "dataset.json").read_text())
    return {k: v["images"] for k, v in get_filenames_of_train_images_and_targets(str(raw_folder), ds_json).items()}


def check_raw_dataset(raw_folder: Path, allow_non_ct: bool = False) -> dict:
    """dataset.json and every image readable, 3D, finite, with spacing, CT in HU (unless allow_non_ct); one
    channel. Returns dataset.json."""
    ds_file = raw_folder / "dataset.json"
    if not ds_file.is_file():
        raise UserError(f"{ds_file} is missing; every nnU-Net raw dataset needs one")
    try:
        ds_json = json.loads(ds_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{ds_file} is not valid JSON ({e}); fix it") from None
    channels = ds_json.get("channel_names", ds_json.get("modality", {}))
    if len(channels) != 1:
        raise UserError(f"{raw_folder.name} has {len(channels)} input channels ({channels}); pretraining uses "
                        f"one CT channel: import the CT channel alone with `himae-nnunet import-scans`")
    name = str(next(iter(channels.values())))
    if "ct" not in name.lower():
        print(f"  note: channel 0 of {raw_folder.name} is named {name!r}, not CT; it is windowed as CT (HU)")
    cases = raw_images(raw_folder)
    if not cases:
        raise UserError(f"{raw_folder} has no training images (imagesTr is empty)")
    for files in cases.values():
        for f in files:
            image = read_scan(f)
            if not allow_non_ct:
                check_ct_hu(image, f)
    return ds_json


def preprocessed_complete(folder: Path, cases) -> bool:
    return folder.is_dir() and all((folder / f"{c}{ext}").is_file() for c in cases
                                   for ext in (".b2nd", "_seg.b2nd", ".pkl"))


def prepare_dataset(dataset, spacing=DEFAULT_SPACING, window=DEFAULT_WINDOW, crop_size=(96, 96, 96),
                    plans_name: str | None = None, source_plans: str = "nnUNetPlans", num_processes: int = 2,
                    overwrite: bool = False, check_images: bool = True, allow_non_ct: bool = False) -> Path:
    """Plan (if the dataset has no plans yet) and preprocess one dataset for pretraining.

    Returns the folder of preprocessed cases."""
    spacing, window = tuple(map(float, spacing)), tuple(map(float, window))
    check_settings(spacing, window, crop_size)
    raw_root, pre_root = require_folder("nnUNet_raw"), require_folder("nnUNet_preprocessed")
    name = dataset_name(dataset)
    raw_folder = raw_root / name
    if not raw_folder.is_dir():
        raise UserError(f"{name} is not in nnUNet_raw ({raw_root}); pretraining preparation reads the raw images")
    plans_name = plans_name or default_plans_name(spacing, window)
    if plans_name == source_plans:
        raise UserError(f"--plans-name {plans_name} would overwrite the dataset's own plans; choose another name")
    print(f"{name}: preparing pretraining data ({plans_name}: spacing {list(spacing)} mm, "
          f"window {list(window)} HU -> [0, 1])")
    if check_images:
        check_raw_dataset(raw_folder, allow_non_ct)
    pre_folder = pre_root / name
    ds_id = dataset_id(name)
    base = ensure_base_plans(pre_folder, source_plans, num_processes)
    if not (pre_folder / "dataset.json").is_file():
        shutil.copy(raw_folder / "dataset.json", pre_folder / "dataset.json")

    plans = pretrain_plans(base, plans_name, spacing, window, crop_size, source_plans)
    plans_file = pre_folder / f"{plans_name}.json"
    data_folder = pre_folder / plans["configurations"][CONFIGURATION]["data_identifier"]
    cases = raw_images(raw_folder)
    if plans_file.is_file() and not overwrite:
        old = json.loads(plans_file.read_text())
        if old.get(PLANS_KEY, {}).get("spacing") != plans[PLANS_KEY]["spacing"] or \
                old.get(PLANS_KEY, {}).get("window") != plans[PLANS_KEY]["window"]:
            raise UserError(f"{plans_file} exists with other settings ({old.get(PLANS_KEY)}); give another "
                            f"--plans-name, or --overwrite to replace it")
        if preprocessed_complete(data_folder, cases):
            print(f"  already prepared: {data_folder} ({len(cases)} cases); --overwrite redoes it")
            return data_folder
    write_text_atomic(plans_file, json.dumps(plans, indent=2))
    try:
        nnunet_command("nnUNetv2_preprocess", "-d", ds_id, "-plans_name", plans_name, "-c", CONFIGURATION,
                       "-np", num_processes)
        if not preprocessed_complete(data_folder, cases):
            raise UserError(f"nnUNetv2_preprocess finished but {data_folder} lacks cases; see its output above")
    except BaseException:
        shutil.rmtree(data_folder, ignore_errors=True)  # nothing half-written
        plans_file.unlink(missing_ok=True)
        raise
    print(f"  done: {len(cases)} cases in {data_folder}")
    return data_folder


# ---------------------------------------------------------------- import-scans

def case_ids(scans: list[Path], root: Path) -> list[str]:
    """Readable, unique nnU-Net case identifiers from scan paths relative to `root`."""
    ids, seen = [], set()
    for p in scans:
        rel = p.relative_to(root) if p != root else Path(root.name)
        stem = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", "", "_".join(rel.parts), flags=re.I)
        base = re.sub(r"[^A-Za-z0-9-]+", "_", stem).strip("_") or "scan"
        cid, n = base, 1
        while cid.lower() in seen:
            n += 1
            cid = f"{base}_{n}"
        seen.add(cid.lower())
        ids.append(cid)
    return ids


def import_scans(input_dir, dataset_id: int, name: str, skip_bad_cases: bool = False,
                 allow_non_ct: bool = False) -> Path:
    """Unlabelled scans (NIfTI, NRRD, MHA, DICOM series; mixed) -> nnUNet_raw/DatasetXXX_NAME.

    Images become CASE_0000.nii.gz. labelsTr holds a body mask (HU > -500, label 1 "body"): nnU-Net's
    fingerprint extraction fails on a dataset without any foreground voxel, and its dataset classes expect a
    segmentation per case; the mask keeps the dataset valid for every stock nnU-Net command. It is derived
    from the image, not an annotation (dataset.json says so). Written to a temporary folder, renamed at the end."""
    import SimpleITK as sitk
    raw_root = require_folder("nnUNet_raw")
    require_folder("nnUNet_preprocessed")
    require_free_dataset_id(dataset_id)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise UserError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    input_dir = Path(input_dir)
    scans = find_scans(input_dir)
    ds_name = f"Dataset{int(dataset_id):03d}_{name}"
    final, tmp = raw_root / ds_name, raw_root / f".{ds_name}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    written, skipped = [], []
    try:
        for scan, cid in zip(scans, case_ids(scans, input_dir)):
            try:
                image = read_scan(scan)
                if not allow_non_ct:
                    check_ct_hu(image, scan)
            except UserError as e:
                if not skip_bad_cases:
                    raise UserError(f"{e}\n(nothing was imported; --skip-bad-cases leaves bad scans out)") from None
                skipped.append(f"{scan}: {e}")
                continue
            if image.GetPixelID() in (sitk.sitkFloat64, sitk.sitkInt64, sitk.sitkUInt64):
                image = sitk.Cast(image, sitk.sitkFloat32)
            sitk.WriteImage(image, str(tmp / "imagesTr" / f"{cid}_0000.nii.gz"))
            body = sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) > BODY_THRESHOLD_HU, sitk.sitkUInt8)
            sitk.WriteImage(body, str(tmp / "labelsTr" / f"{cid}.nii.gz"))
            written.append(cid)
            print(f"  {scan} -> {cid} {image.GetSize()} spacing {tuple(round(s, 3) for s in image.GetSpacing())}")
        if not written:
            raise UserError(f"no usable scan in {input_dir}; all {len(skipped)} were skipped:\n" + "\n".join(skipped))
        (tmp / "dataset.json").write_text(json.dumps(dict(
            channel_names={"0": "CT"}, labels={"background": 0, "body": 1}, numTraining=len(written),
            file_ending=".nii.gz", name=name,
            description=f"unlabelled scans imported by himae-nnunet import-scans from {input_dir}; labelsTr hold "
                        f"a body mask (HU > {BODY_THRESHOLD_HU:g}) derived from each image, not an annotation",
            himae_unlabelled=True), indent=2))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"imported {len(written)} scans into {final}" + (f"; skipped {len(skipped)}:" if skipped else ""))
    for s in skipped:
        print(f"  skipped {s}")
    return final
