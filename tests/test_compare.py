"""`himae-nnunet compare` end to end on real CT, smallest settings: slabs of patient A train, patient B tests.

Two arms (scratch and one pretrained tiny checkpoint), one budget (1-shot), two draws, one protocol, a smoke
schedule; every output file is checked, and a second run must skip every finished cell (no retraining), while
a half-finished cell is redone.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_plan import tiny_checkpoint

BIN = Path(sys.executable).parent
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def himae(*args, env) -> str:
    proc = subprocess.run([str(BIN / "himae-nnunet"), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=3600)  # a hang guard: about 5 min on an idle 2-core machine
    assert proc.returncode == 0, f"himae-nnunet {args} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    if not DATA.exists():
        pytest.skip(f"{DATA} is absent")
    root = tmp_path_factory.mktemp("compare")
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "nnUNet_preprocessed",
                                                            "nnUNet_results")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_compile="f", nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")
    (root / "raw").mkdir()
    himae("evidence-dataset", "--data", DATA, "--dataset-id", 521, "--slabs", 3, env=env)
    ckpt, _ = tiny_checkpoint(root / "tiny.pt", crop=32, preset="vit_tiny_p8")
    args = ["compare", 521, "-o", root / "out", "--pretrained", f"tiny={ckpt}", "--shots", 1, "--draws", 2,
            "--protocols", "full", "--no-nnunet", "--epochs", 1, "--iterations-per-epoch", 2,
            "--val-iterations-per-epoch", 1, "--patch-size", 16, 32, 32, "--feature-size", 8]
    first = himae(*args, env=env)
    return dict(root=root, out=root / "out", env=env, args=args, first=first)


def test_outputs(compared):
    out = compared["out"]
    assert "4 cells: 0 finished (skipped), 4 to run" in compared["first"]
    folds = json.loads((out / "setup" / "folds.json").read_text())["1-shot"]
    assert len(folds) == 2 and folds[0]["train"] != folds[1]["train"]  # two distinct draws of one slab
    for name in ("scratch__full__1-shot__draw0", "tiny__full__1-shot__draw1"):
        cell = out / "cells" / name
        for log in ("train.log", "predict.log", "evaluate.log"):
            assert "$ nnUNetv2_" in (cell / log).read_text()
        assert (cell / "predictions" / "patientB.nii.gz").is_file()
        assert json.loads((cell / "cell.json").read_text())["seconds"]["train"] > 0
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 6  # arms x draws x labels, one test case
    assert {r["case"] for r in rows} == {"patientB"} and {r["label_name"] for r in rows} >= {"liver", "spleen"}
    assert all(r["Dice"] == "" or 0 <= float(r["Dice"]) <= 1 for r in rows)
    assert len(json.loads((out / "per_case.json").read_text())) == len(rows)
    summary = json.loads((out / "summary.json").read_text())
    assert {(s["arm"], s["draws"]) for s in summary} == {("scratch", 2), ("tiny", 2)}
    assert all(s["ci_low"] <= s["mean"] <= s["ci_high"] for s in summary if s["n"])
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert [(c["arm"], c["reference"]) for c in comparisons] == [("tiny", "scratch (full)")]
    assert (out / "summary.csv").is_file() and (out / "comparisons.csv").is_file()
    report = (out / "report.md").read_text()
    assert "| tiny | full | 1-shot | 2 |" in report and "Wilcoxon" in report and "not finished" not in report
    assert (out / "dice_vs_budget.png").stat().st_size > 10000


def test_rerun_skips_finished_cells_and_redoes_a_half_finished_one(compared):
    out = compared["out"]
    model = (out / "nnUNet_results").rglob("fold_*/checkpoint_final.pth")
    stamps = {p: p.stat().st_mtime_ns for p in model}
    half = out / "cells" / "scratch__full__1-shot__draw1"
    (half / "cell.json").unlink()  # as if killed after evaluation, before the cell was recorded
    again = himae(*compared["args"], env=compared["env"])
    assert "4 cells: 3 finished (skipped), 1 to run" in again
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert len(changed) == 1 and "nnUNetTrainerUNETR__" in str(changed[0])  # only that cell retrained
    assert (half / "cell.json").is_file()


def test_other_settings_are_refused(compared):
    args = [a if a != 2 else 3 for a in compared["args"]]  # --draws 3 (and iterations 3) on the same folder
    proc = subprocess.run([str(BIN / "himae-nnunet"), *map(str, args)], env=compared["env"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "Traceback" not in proc.stderr
