"""One-shot segmentation on real CT: UNETR from scratch vs MAE vs Hi-End-MAE pretraining (the paper's one-shot
setting, with two patients instead of six datasets).

    python examples/one_shot_real_ct.py --work /tmp/one_shot                        # small, CPU (~1 h on 2 cores)
    python examples/one_shot_real_ct.py --work /data/one_shot --scale full --device cuda

Every step is a command a user types (printed as it runs), in its own nnU-Net folders under --work:
 1. unlabelled CTs of ../shared/data (patient B, the test patient, left out) -> `himae-nnunet import-scans`
 2. `himae-nnunet pretrain --method hiend` and `--method mae` on them (same model, data, steps)
 3. patients A and B -> an nnU-Net dataset (shared organs 1..6); `himae-nnunet plan` per checkpoint;
    `nnUNetv2_preprocess`; `himae-nnunet split --cases patientA` (fold 0: train A, validate B)
 4. `nnUNetv2_train` fold 0: nnUNetTrainerUNETR (scratch), nnUNetTrainerHiEndMAE with the MAE and the
    Hi-End-MAE checkpoint; nnU-Net's own validation of fold 0 is the evaluation on patient B
 5. a table: Dice per organ on B (nnU-Net's evaluator, B's original grid) and run times -> --work/results.md
Steps already done are skipped, so an interrupted run continues where it stopped.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from himae_nnunet.scans.oneshot_dataset import SHARED_ORGANS, write_ab_dataset

BIN = Path(sys.executable).parent
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRETRAIN_SCANS = ["ct_abdomen_ts_full/example_ct.nii.gz", "ct_spleen_msd/sub-spleen2_ct.nii.gz",
                  "ct_aorta_cta/ct_cropped.nii.gz", "ct_pulmonary/ct_cropped.nii.gz",
                  "ct_lung_radiomics1/lung1_image.nrrd"]  # patient B left out; ct_abdomen_ts_small is a crop of A
# Fine-tuning amount: the paper's one-shot 5000 "epochs" are passes over one volume x 4 crops = 20000 crops;
# full scale matches that with 40 nnU-Net epochs x 250 iterations x batch 2.
SCALES = {
    "small": dict(spacing=3.0, model="vit_tiny", crop=48, steps=150, volumes=2, crops=4, workers=1,
                  patch=48, feature=16, batch=2, epochs=12, iterations=25, tta=False),
    "full": dict(spacing=1.5, model="vit_b12_1536", crop=96, steps=20000, volumes=4, crops=8, workers=8,
                 patch=96, feature=32, batch=2, epochs=40, iterations=250, tta=True),
}
PRETRAIN_ID, TARGET_ID = 601, 501
RUNS = [("scratch", "nnUNetTrainerUNETR", "HiEndPlans"), ("MAE", "nnUNetTrainerHiEndMAE", "MAEPlans"),
        ("Hi-End-MAE", "nnUNetTrainerHiEndMAE", "HiEndPlans")]


def sh(*cmd, env) -> float:
    """Run one command (printed), stop on failure; returns seconds taken."""
    cmd = [str(c) for c in cmd]
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    if subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return time.time() - t


def main() -> None:
    """The experiment as a script to read top to bottom: each stage is one command, in order."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the nnU-Net folders, runs and results")
    ap.add_argument("--scale", choices=list(SCALES), default="small")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--data", default=str(DATA), help="the shared real-data folder")
    ap.add_argument("--steps", type=int, help="pretraining steps (overrides the scale's)")
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs (overrides the scale's)")
    a = ap.parse_args()
    s = dict(SCALES[a.scale])
    s.update({k: v for k, v in (("steps", a.steps), ("epochs", a.epochs)) if v})
    work, data = Path(a.work).resolve(), Path(a.data)
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(work / var)
    env["nnUNet_extTrainer"] = subprocess.run([str(BIN / "himae-nnunet"), "ext-trainer-path"], env=env,
                                              capture_output=True, text=True, check=True).stdout.strip()
    if a.device == "cpu":
        env.update(nnUNet_compile="f", nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1")
    times, sp = {}, [s["spacing"]] * 3

    # 1-2. pretraining data and the two pretrainings
    scans = work / "pretrain_scans"
    if not (work / "nnUNet_raw" / f"Dataset{PRETRAIN_ID}_PretrainCT").exists():
        scans.mkdir(exist_ok=True)
        for rel in PRETRAIN_SCANS:
            link = scans / rel.replace("/", "__")
            link.unlink(missing_ok=True)
            link.symlink_to(data / rel)
        times["prepare pretraining data"] = sh("himae-nnunet", "import-scans", "-i", scans, "--dataset-id",
                                               PRETRAIN_ID, "--name", "PretrainCT", "--spacing", *sp,
                                               "--crop-size", s["crop"], "-np", 2, env=env)
    ckpts = {}
    for method in ("hiend", "mae"):
        run = work / f"pretrain_{method}"
        ckpts[method] = run / "checkpoint_final.pt"
        if not ckpts[method].is_file():
            times[f"pretrain {method}"] = sh(
                "himae-nnunet", "pretrain", "-d", PRETRAIN_ID, "-o", run, "--model", s["model"], "--method", method,
                "--steps", s["steps"], "--crop-size", s["crop"], "--batch-volumes", s["volumes"],
                "--crops-per-volume", s["crops"], "--workers", s["workers"], "--device", a.device,
                "--checkpoint-every", max(50, s["steps"] // 10), "--no-tensorboard", env=env)

    # 3. target dataset, plans per checkpoint, preprocessing, the A -> B fold
    raw = work / "nnUNet_raw" / f"Dataset{TARGET_ID:03d}_OneShotAB"
    if not raw.exists():
        write_ab_dataset(data, work / "nnUNet_raw", TARGET_ID)
    pre = work / "nnUNet_preprocessed" / raw.name
    for method, plans in (("hiend", "HiEndPlans"), ("mae", "MAEPlans")):
        if not (pre / f"{plans}_3d_fullres_zlin").exists():
            opts = ["--epochs", s["epochs"], "--iterations-per-epoch", s["iterations"]] + \
                   ([] if s["tta"] else ["--no-tta-mirroring"])
            times[f"plan + preprocess {plans}"] = sh(
                "himae-nnunet", "plan", TARGET_ID, "--checkpoint", ckpts[method], "--plans-name", plans,
                "--patch-size", *[s["patch"]] * 3, "--feature-size", s["feature"], "--batch-size", s["batch"],
                "--preprocess", "-np", 2, *opts, "--overwrite", env=env)
    sh("himae-nnunet", "split", TARGET_ID, "--cases", "patientA", env=env)

    # 4. fine-tuning; fold 0 validates on patient B
    results = {}
    for name, trainer, plans in RUNS:
        fold = work / "nnUNet_results" / raw.name / f"{trainer}__{plans}__3d_fullres" / "fold_0"
        summary = fold / "validation" / "summary.json"
        if not summary.is_file():
            times[f"fine-tune {name}"] = sh("nnUNetv2_train", TARGET_ID, "3d_fullres", 0, "-tr", trainer, "-p", plans,
                                            "-device", a.device, env=env)
        results[name] = json.loads(summary.read_text())

    # 5. the table
    organs = list(SHARED_ORGANS)
    lines = [f"| model | {' | '.join(organs)} | mean |", "|---" * (len(organs) + 2) + "|"]
    for name, res in results.items():
        dice = [res["mean"][str(i)]["Dice"] for i in range(1, len(organs) + 1)]
        lines.append(f"| {name} | " + " | ".join(f"{100 * d:.1f}" for d in dice)
                     + f" | {100 * res['foreground_mean']['Dice']:.1f} |")
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    text = (f"Scale {a.scale} ({s}), device {a.device}. Dice (%) on patient B, nnU-Net's evaluator.\n\n"
            + "\n".join(lines) + "\n")
    (work / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
