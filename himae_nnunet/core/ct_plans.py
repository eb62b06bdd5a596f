"""The one rule that writes our CT preprocessing into nnU-Net plans, and the one way to get a dataset's base plans.

Pretraining plans (pretrain/prepare.py) and ViT plans (vit_plans/planning.py) are both copies of a dataset's
nnU-Net plans in which this module sets three things:
- the target spacing;
- the HU window through stock CTNormalization: clip to [lo, hi], subtract lo, divide by hi - lo -> [0, 1];
- resampling that interpolates along the slice axis too. For a spacing ratio above 3 (e.g. 0.7 x 0.7 x 5 mm)
  nnU-Net resamples the slice axis separately with `order_z: 0`, i.e. it repeats slices (70 % of the 1.5 mm
  slices of a 5 mm scan are copies); the authors interpolate every axis. We keep nnU-Net's separate in-plane
  cubic resampling and set `order_z: 1` (linear between neighbouring slices), visible in the plans'
  `resampling_fn_*_kwargs`.
The data identifier carries the resampling rule, so data preprocessed under another rule is never reused.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import dataset_id

SLICE_AXIS_ORDER = 1  # spline order along the slice axis of thick-slice scans (nnU-Net's default: 0)
RESAMPLING_TAG = "zlin"  # names the rule in data identifiers
RESAMPLING_KWARGS = ("resampling_fn_data_kwargs", "resampling_fn_seg_kwargs", "resampling_fn_probabilities_kwargs")


def data_identifier(plans_name: str, configuration: str) -> str:
    """nnU-Net's `<plans>_<configuration>`, plus the resampling rule."""
    return f"{plans_name}_{configuration}_{RESAMPLING_TAG}"


def window_properties(window) -> dict:
    """CTNormalization's intensity properties that map the HU `window` to [0, 1]."""
    lo, hi = map(float, window)
    if hi <= lo:
        raise UserError(f"intensity window {[lo, hi]} must be [low, high] with low < high")
    return dict(percentile_00_5=lo, percentile_99_5=hi, mean=lo, std=hi - lo)


def set_ct_preprocessing(plans: dict, configuration: str, spacing, window, ct_channels=(0,)) -> None:
    """Write spacing, the CT window of `ct_channels`, slice-axis interpolation and the data identifier into
    `plans` (in place; `plans_name` must already be the new one)."""
    cfg = plans["configurations"][configuration]
    cfg["spacing"] = [float(s) for s in spacing]
    cfg["data_identifier"] = data_identifier(plans["plans_name"], configuration)
    for key in RESAMPLING_KWARGS:
        if key in cfg:
            cfg[key] = {**cfg[key], "order_z": SLICE_AXIS_ORDER}
    props = plans.setdefault("foreground_intensity_properties_per_channel", {})
    for c in ct_channels:
        props[str(c)] = {**props.get(str(c), {}), **window_properties(window)}


def nnunet_command(name: str, *args) -> None:
    """Run a stock nnU-Net command in a child process, so it sees the current nnUNet_* variables (nnunetv2.paths
    reads them once, at import); on failure raise UserError with the end of its output."""
    exe = Path(sys.executable).with_name(name)
    cmd = [str(exe) if exe.exists() else name, *map(str, args)]
    print("  $", name, *cmd[1:], flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    except FileNotFoundError:
        raise UserError(f"{name} was not found; install nnunetv2 into this environment") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise UserError(f"{name} failed (exit {proc.returncode}); its last output:\n{tail}")


def ensure_base_plans(pre_folder: Path, base_plans: str = "nnUNetPlans", num_processes: int = 2,
                      verify: bool = False) -> dict:
    """A dataset's nnU-Net plans `pre_folder/<base_plans>.json`; when the default plans are missing, stock
    fingerprint extraction (an existing fingerprint is reused) and planning make them."""
    path = Path(pre_folder) / f"{base_plans}.json"
    if not path.is_file():
        if base_plans != "nnUNetPlans":
            raise UserError(f"base plans {path} do not exist; plan the dataset with that nnU-Net planner first, "
                            f"or use nnU-Net's default plans (nnUNetPlans), which are made when missing")
        name = Path(pre_folder).name
        print(f"  {name} has no nnU-Net plans yet: running nnU-Net's fingerprint extraction and planning")
        nnunet_command("nnUNetv2_extract_fingerprint", "-d", dataset_id(name), "-np", num_processes,
                       *(["--verify_dataset_integrity"] if verify else []))
        nnunet_command("nnUNetv2_plan_experiment", "-d", dataset_id(name))
    return json.loads(path.read_text())
