"""End to end with stock nnU-Net commands on real CT: patient A trains, patient B (from DICOM) validates.

nnUNetv2_plan_and_preprocess -> himae-nnunet plan (tiny checkpoint) -> nnUNetv2_preprocess -> himae-nnunet split
-> nnUNetv2_train (smoke trainer, CPU) -> nnUNetv2_predict -> nnUNetv2_evaluate_folder; and the baseline through
`himae-nnunet export-pretrained` + stock `-pretrained_weights` with the `train` / `predict` wrappers.
Small on purpose: 3 mm spacing, 32^3 patches, vit_tiny, UNETR width 8, 2 x 10 iterations.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from himae_nnunet.scans.oneshot_dataset import CASE_B, write_ab_dataset
from test_plan import tiny_checkpoint

BIN = Path(sys.executable).parent
PLANS, TRAINER = "HiEndMAEPlans", "nnUNetTrainerHiEndMAE_smoke"


def run(*cmd, env=None, stdout_only=False) -> str:
    proc = subprocess.run([str(BIN / cmd[0]), *map(str, cmd[1:])], env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-4000:]}"
    return proc.stdout if stdout_only else out


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Dataset, baseline plans and data, ViT plans and data, the A -> B fold; env without nnUNet_extTrainer."""
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not data.exists():
        pytest.skip(f"{data} is absent")
    root = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        env[var] = str(root / var)
    env.update(nnUNet_compile="f", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    raw = write_ab_dataset(data, root / "nnUNet_raw")
    ckpt, _ = tiny_checkpoint(root / "tiny.pt", crop=48)  # pretraining grid 3^3, fine-tuning grid 2^3
    run("nnUNetv2_plan_and_preprocess", "-d", 501, "-c", "3d_fullres", "-np", 1, "--verify_dataset_integrity", env=env)
    pre = root / "nnUNet_preprocessed" / raw.name
    baseline = digests(pre / "nnUNetPlans_3d_fullres") | {"plans": digests(pre)["nnUNetPlans.json"]}
    out = run("himae-nnunet", "plan", 501, "--checkpoint", ckpt, "--patch-size", 32, 32, 32, "--feature-size", 8,
              env=env)
    assert "export nnUNet_extTrainer=" in out  # not set in env: the exact line to run is printed
    run("nnUNetv2_preprocess", "-d", 501, "-plans_name", PLANS, "-c", "3d_fullres", "-np", 1, env=env)
    out = run("himae-nnunet", "split", 501, "--cases", "patientA", env=env)
    assert "fold 0: train 1 [patientA], val 1" in out
    env["nnUNet_n_proc_DA"] = "0"  # training: augmentation in the main process (planning needs it > 0)
    return dict(root=root, env=env, raw=raw, pre=pre, ckpt=ckpt, baseline=baseline)


def check_same_geometry(pred_file: Path, image_file: Path) -> np.ndarray:
    import SimpleITK as sitk
    pred, image = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(image_file))
    assert pred.GetSize() == image.GetSize()
    assert np.allclose(pred.GetSpacing(), image.GetSpacing()) and np.allclose(pred.GetOrigin(), image.GetOrigin())
    assert np.allclose(pred.GetDirection(), image.GetDirection())
    labels = sitk.GetArrayFromImage(pred)
    assert set(np.unique(labels)) <= set(range(7))
    return labels


def test_hiend_mae_chain(chain):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    env, root, pre = chain["env"], chain["root"], chain["pre"]
    # ViT data: stock preprocessing with our plans gives [0, 1] at 3 mm; the baseline plans and data are untouched
    folder = pre / f"{PLANS}_3d_fullres_zlin"
    data, seg, _, props = infer_dataset_class(str(folder))(str(folder), ["patientA"]).load_case("patientA")
    data = np.asarray(data)
    assert data.min() >= 0 and data.max() <= 1 and data.max() > 0.99 and data.shape[1:] == (112, 101, 122)
    assert digests(pre / "nnUNetPlans_3d_fullres") | {"plans": digests(pre)["nnUNetPlans.json"]} == chain["baseline"]

    env_ext = env | {"nnUNet_extTrainer": run("himae-nnunet", "ext-trainer-path", env=env, stdout_only=True).strip()}
    run("nnUNetv2_train", 501, "3d_fullres", 0, "-tr", TRAINER, "-p", PLANS, "-device", "cpu", env=env_ext)
    fold = root / "nnUNet_results" / chain["raw"].name / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    loaded = json.loads((fold / "pretrained_weights.json").read_text())
    assert "encoder.blocks.11.attn.proj.weight" in loaded["loaded"]
    assert loaded["resized"] == ["encoder.pos_embed grid (3, 3, 3) -> (2, 2, 2) (fixed sin-cos table rebuilt)"]
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "pretrained weights from" in log and "random init (not in the file): decoder." in log
    assert (fold / "validation" / f"{CASE_B}.nii.gz").is_file()

    pred = root / "pred"
    run("nnUNetv2_predict", "-i", chain["raw"] / "imagesTs", "-o", pred, "-d", 501, "-c", "3d_fullres", "-f", 0,
        "-tr", TRAINER, "-p", PLANS, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", 1, "-nps", 1,
        env=env_ext)
    check_same_geometry(pred / f"{CASE_B}.nii.gz", chain["raw"] / "imagesTs" / f"{CASE_B}_0000.nii.gz")
    run("nnUNetv2_evaluate_folder", chain["raw"] / "labelsTs", pred, "-djfile", pre / "dataset.json",
        "-pfile", fold.parent / "plans.json", env=env)
    summary = json.loads((pred / "summary.json").read_text())
    dice = {int(k): v["Dice"] for k, v in summary["mean"].items()}
    assert sorted(dice) == [1, 2, 3, 4, 5, 6]
    assert all(np.isnan(d) or 0 <= d <= 1 for d in dice.values())


def test_baseline_with_stock_pretrained_weights_and_wrappers(chain):
    env, root, pre = chain["env"], chain["root"], chain["pre"]
    full = root / "full_network.pth"
    run("himae-nnunet", "export-pretrained", "--plans", pre / f"{PLANS}.json", "-o", full, env=env)
    trainer = "nnUNetTrainerUNETR_smoke"
    out = run("himae-nnunet", "train", 501, "3d_fullres", 0, "-tr", trainer, "-device", "cpu",
              "-pretrained_weights", full, env=env)  # the wrapper sets nnUNet_extTrainer and -p
    assert "Loading pretrained weights from file" in out
    fold = root / "nnUNet_results" / chain["raw"].name / f"{trainer}__{PLANS}__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / "pretrained_weights.json").exists()
    pred = root / "pred_baseline"
    run("himae-nnunet", "predict", "-i", chain["raw"] / "imagesTs", "-o", pred, "-d", 501, "-f", 0, "-tr", trainer,
        "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", 1, "-nps", 1, env=env)
    check_same_geometry(pred / f"{CASE_B}.nii.gz", chain["raw"] / "imagesTs" / f"{CASE_B}_0000.nii.gz")
