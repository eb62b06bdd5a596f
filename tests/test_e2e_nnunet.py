"""End to end with stock nnU-Net commands on real CT: patient A trains, patient B (from DICOM) validates.

nnUNetv2_plan_and_preprocess -> himae-nnunet plan (tiny checkpoint) -> nnUNetv2_preprocess -> himae-nnunet split
-> nnUNetv2_train (smoke trainer, CPU) -> nnUNetv2_predict -> nnUNetv2_evaluate_folder; resuming and
re-validating that fold after the pretraining file moved; sharing it as a zip into a fresh nnU-Net tree; the
full-network-file route (`himae-nnunet export-pretrained` + stock `-pretrained_weights`) under a trainer name
of its own, with the `train` / `predict` wrappers; and nnU-Net's model selection over both.
Small on purpose: 3 mm spacing, 32^3 patches, vit_tiny, UNETR width 8, 2 x 10 iterations. The trained folds are
module fixtures, shared by the tests; the chain itself (tests/nnunet_chain.py) is built once per session.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from himae_nnunet.scans.oneshot_dataset import CASE_B
from nnunet_chain import PLANS, digests, run
from test_plan import tiny_checkpoint

TRAINER = "nnUNetTrainerHiEndMAE_smoke"
FILE_TRAINER = "nnUNetTrainerUNETRPretrainedWeights_smoke"


def results(chain, trainer: str) -> Path:
    return chain["root"] / "nnUNet_results" / chain["raw"].name / f"{trainer}__{PLANS}__3d_fullres"


@pytest.fixture(scope="module")
def hiend_fold(chain) -> Path:
    """Fold 0 trained with the pretrained encoder by stock nnUNetv2_train."""
    run("nnUNetv2_train", 501, "3d_fullres", 0, "-tr", TRAINER, "-p", PLANS, "-device", "cpu", env=chain["env_ext"])
    return results(chain, TRAINER) / "fold_0"


@pytest.fixture(scope="module")
def file_fold(chain) -> Path:
    """Fold 0 started from an exported full-network file through stock -pretrained_weights (the wrapper)."""
    full = chain["root"] / "full_network.pth"
    out = run("himae-nnunet", "export-pretrained", "--plans", chain["pre"] / f"{PLANS}.json", "-o", full,
              env=chain["env"])
    assert f"-tr nnUNetTrainerUNETRPretrainedWeights -p {PLANS} -pretrained_weights" in out
    chain["full"] = full
    out = run("himae-nnunet", "train", 501, "3d_fullres", 0, "-tr", FILE_TRAINER, "-device", "cpu",
              "-pretrained_weights", full, env=chain["env"])  # the wrapper sets nnUNet_extTrainer and -p
    assert "Loading pretrained weights from file" in out
    return results(chain, FILE_TRAINER) / "fold_0"


def check_same_geometry(pred_file: Path, image_file: Path) -> np.ndarray:
    import SimpleITK as sitk
    pred, image = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(image_file))
    assert pred.GetSize() == image.GetSize()
    assert np.allclose(pred.GetSpacing(), image.GetSpacing()) and np.allclose(pred.GetOrigin(), image.GetOrigin())
    assert np.allclose(pred.GetDirection(), image.GetDirection())
    labels = sitk.GetArrayFromImage(pred)
    assert set(np.unique(labels)) <= set(range(7))
    return labels


def test_hiend_mae_chain(chain, hiend_fold):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    env, root, pre, fold = chain["env"], chain["root"], chain["pre"], hiend_fold
    # ViT data: stock preprocessing with our plans gives [0, 1] at 3 mm; the baseline plans and data are untouched
    folder = pre / f"{PLANS}_3d_fullres_zlin"
    data, seg, _, props = infer_dataset_class(str(folder))(str(folder), ["patientA"]).load_case("patientA")
    data = np.asarray(data)
    assert data.min() >= 0 and data.max() <= 1 and data.max() > 0.99 and data.shape[1:] == (112, 101, 122)
    assert digests(pre / "nnUNetPlans_3d_fullres") | {"plans": digests(pre)["nnUNetPlans.json"]} == chain["baseline"]

    assert (fold / "checkpoint_final.pth").is_file()
    loaded = json.loads((fold / "pretrained_weights.json").read_text())
    assert "encoder.blocks.11.attn.proj.weight" in loaded["loaded"]
    assert loaded["resized"] == ["encoder.pos_embed grid (3, 3, 3) -> (2, 2, 2) (fixed sin-cos table rebuilt)"]
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "pretrained weights from" in log and "random init (not in the file): decoder." in log
    # the LR nnU-Net logs (and plots) is the decoder's: 1e-4, cosine to 5e-5 at epoch 1 of 2; the encoder's
    # groups are frozen in epoch 0 and layer-decayed by 0.5 per block
    assert [line.split(": ")[-1].strip() for line in log.splitlines() if "Current learning rate" in line] == ["0.0001", "5e-05"]
    assert (fold / "validation" / f"{CASE_B}.nii.gz").is_file()

    pred = root / "pred"
    run("nnUNetv2_predict", "-i", chain["raw"] / "imagesTs", "-o", pred, "-d", 501, "-c", "3d_fullres", "-f", 0,
        "-tr", TRAINER, "-p", PLANS, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", 1, "-nps", 1,
        env=chain["env_ext"])
    check_same_geometry(pred / f"{CASE_B}.nii.gz", chain["raw"] / "imagesTs" / f"{CASE_B}_0000.nii.gz")
    run("nnUNetv2_evaluate_folder", chain["raw"] / "labelsTs", pred, "-djfile", pre / "dataset.json",
        "-pfile", fold.parent / "plans.json", env=env)
    summary = json.loads((pred / "summary.json").read_text())
    dice = {int(k): v["Dice"] for k, v in summary["mean"].items()}
    assert sorted(dice) == [1, 2, 3, 4, 5, 6]
    assert all(np.isnan(d) or 0 <= d <= 1 for d in dice.values())


def small_image(chain, folder: Path) -> Path:
    """The central quarter of patient B's slices: a quick prediction."""
    import SimpleITK as sitk
    image = sitk.ReadImage(str(chain["raw"] / "imagesTs" / f"{CASE_B}_0000.nii.gz"))
    folder.mkdir()
    x, y, _ = image.GetSize()
    sitk.WriteImage(image[x // 4:3 * x // 4, y // 4:3 * y // 4, :], str(folder / f"{CASE_B}_0000.nii.gz"))
    return folder / f"{CASE_B}_0000.nii.gz"


PYTHON_API = """
import sys

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

if __name__ == "__main__":  # nnU-Net's export workers re-import this file
    predictor = nnUNetPredictor(device=__import__("torch").device("cpu"), use_mirroring=False)
    try:
        predictor.initialize_from_trained_model_folder(sys.argv[1], (0,))
    except RuntimeError as e:
        print("without the line:", str(e)[:60])
    from himae_nnunet.vit_plans.cli import with_ext_trainer_env; with_ext_trainer_env()  # the one line
    predictor.initialize_from_trained_model_folder(sys.argv[1], (0,))
    predictor.predict_from_files(sys.argv[2], sys.argv[3], num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
"""


def test_model_shared_as_zip_predicts_in_a_fresh_tree(chain, hiend_fold, tmp_path):
    zipped = tmp_path / "model.zip"
    run("nnUNetv2_export_model_to_zip", "-d", 501, "-o", zipped, "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS,
        "-f", 0, env=chain["env"])
    fresh = {k: v for k, v in chain["env"].items() if k not in ("nnUNet_raw", "nnUNet_preprocessed")}
    fresh["nnUNet_results"] = str(tmp_path / "results")  # another machine: no data, no pretraining file
    run("nnUNetv2_install_pretrained_model_from_zip", zipped, env=fresh)
    model = tmp_path / "results" / chain["raw"].name / f"{TRAINER}__{PLANS}__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    image = small_image(chain, tmp_path / "in")
    ext = fresh | {"nnUNet_extTrainer": chain["env_ext"]["nnUNet_extTrainer"]}
    run("nnUNetv2_predict", "-i", image.parent, "-o", tmp_path / "p1", "-d", 501, "-c", "3d_fullres", "-f", 0,
        "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "-npp", 1, "-nps", 1, env=ext)
    run("nnUNetv2_predict_from_modelfolder", "-i", image.parent, "-o", tmp_path / "p2", "-m", model, "-f", 0,
        "-device", "cpu", "-npp", 1, "-nps", 1, env=ext)
    script = tmp_path / "api.py"
    script.write_text(PYTHON_API)
    out = run("python", script, model, image.parent, tmp_path / "p3", env=fresh)  # nnUNet_extTrainer unset
    assert "without the line: Could not find requested nnunet trainer" in out
    first = check_same_geometry(tmp_path / "p1" / f"{CASE_B}.nii.gz", image)
    for other in ("p2", "p3"):
        assert np.array_equal(check_same_geometry(tmp_path / other / f"{CASE_B}.nii.gz", image), first)


def test_resume_and_revalidate_after_the_pretraining_file_moved(chain, hiend_fold):
    """--c / --val / --val_best read the fold's own checkpoints only; a fresh start refuses a changed file."""
    ckpt, env = chain["ckpt"], chain["env_ext"]
    train = ("nnUNetv2_train", 501, "3d_fullres", 0, "-tr", TRAINER, "-p", PLANS, "-device", "cpu")
    moved = ckpt.with_name("moved.pt")
    ckpt.rename(moved)
    try:
        logs = set(hiend_fold.glob("training_log_*.txt"))
        run(*train, "--val", "--val_best", env=env)
        run(*train, "--c", env=env)  # finished fold: nothing left to train, validates again
        new_logs = "".join(p.read_text() for p in set(hiend_fold.glob("training_log_*.txt")) - logs)
        assert "pretrained weights from" not in new_logs
        tiny_checkpoint(ckpt, crop=32)  # another file under the planned name
        run(*train, "--c", env=env)  # still fine: the fold holds every weight
        out = run(*train, env=env, fails=True)  # from scratch: the pretraining file is read, and refused
        assert "changed since the plans were made" in out
    finally:
        moved.replace(ckpt)
    assert json.loads((hiend_fold / "validation" / "summary.json").read_text())["mean"]


def test_full_network_file_gets_a_results_folder_of_its_own(chain, file_fold):
    env, root = chain["env"], chain["root"]
    out = run("himae-nnunet", "train", 501, "3d_fullres", 0, "-tr", "nnUNetTrainerUNETR_smoke", "-device", "cpu",
              "-pretrained_weights", chain["full"], env=env, fails=True)
    assert "Train with -tr nnUNetTrainerUNETRPretrainedWeights_smoke instead" in out
    assert not (results(chain, "nnUNetTrainerUNETR_smoke") / "fold_0" / "checkpoint_final.pth").exists()
    assert (file_fold / "checkpoint_final.pth").is_file() and not (file_fold / "pretrained_weights.json").exists()
    pred = root / "pred_file"
    run("himae-nnunet", "predict", "-i", chain["raw"] / "imagesTs", "-o", pred, "-d", 501, "-f", 0, "-tr",
        FILE_TRAINER, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", 1, "-nps", 1, env=env)
    check_same_geometry(pred / f"{CASE_B}.nii.gz", chain["raw"] / "imagesTs" / f"{CASE_B}_0000.nii.gz")


def test_find_best_selects_over_explicit_trainer_plans_pairs(chain, hiend_fold, file_fold):
    env = chain["env"]
    out = run("himae-nnunet", "find-best", 501, "-f", 0, env=env, fails=True)  # default: with nnU-Net's CNN
    assert "nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0 has no validation results; train that fold first: " \
           "nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainer -p nnUNetPlans" in out
    out = run("himae-nnunet", "find-best", 501, "-f", 0, "--model", f"{TRAINER}:{PLANS}", "--model",
              f"{FILE_TRAINER}:{PLANS}", env=env)
    assert "best: " in out and f"{TRAINER}__{PLANS}__3d_fullres" in out and f"{FILE_TRAINER}__{PLANS}" in out
    info = json.loads((chain["root"] / "nnUNet_results" / chain["raw"].name / "inference_information.json").read_text())
    assert len(info["considered_models"]) == 2
