"""`himae-nnunet demo` (the README's first command) end to end, with the shortest schedule."""
import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_and_reports(tmp_path):
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    res = subprocess.run([sys.executable, "-m", "himae_nnunet.cli", "demo", "--workdir", str(work), "--steps", "4",
                          "--epochs", "1", "--iterations", "2", "--train-cases", "1"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((work / "demo_results.json").read_text())
    assert set(report["dice"]) == {"Hi-End-MAE", "scratch UNETR"}
    assert all(set(d) == {"1", "2", "3"} for d in report["dice"].values())
    assert "Dice per label" in res.stdout and "Time per stage" in res.stdout
    assert "95 % bootstrap interval" in res.stdout and "verdict: " in res.stdout
    diff = report["comparison"]["difference"]
    assert diff["n"] == 12 and diff["ci_low"] <= diff["mean_diff"] <= diff["ci_high"]  # 4 test scans x 3 labels
    # one-shot: the fold `split` appended after nnU-Net's five, trained on one scan, under the frozen default
    assert (report["protocol"], report["train_cases"], report["fold"]) == ("frozen", 1, "5")
    assert "protocol: frozen encoder on 1 labelled training scan(s)" in res.stdout
    splits = json.loads((work / "nnUNet_preprocessed" / "Dataset990_HiEndDemo" / "splits_final.json").read_text())
    assert len(splits) == 6 and len(splits[5]["train"]) == 1
    plans = json.loads((work / "nnUNet_preprocessed" / "Dataset990_HiEndDemo" / "nnUNetPlans_himae.json").read_text())
    assert plans["himae"]["finetune"]["freeze_encoder_epochs"] == 1
    for png in report["figures"].values():
        assert Path(png).stat().st_size > 10_000  # real pictures, not empty canvases
    assert len(list((work / "logs").glob("*.log"))) == 11
    fold = work / "nnUNet_results" / "Dataset990_HiEndDemo" / "nnUNetTrainerHiEndMAE__nnUNetPlans_himae__3d_fullres"
    assert (fold / "fold_5" / "checkpoint_final.pth").is_file()
    # a second run refuses a folder the demo did not make
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    res = subprocess.run([sys.executable, "-m", "himae_nnunet.cli", "demo", "--workdir", str(other)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "did not write" in res.stderr and (other / "keep.txt").exists()
