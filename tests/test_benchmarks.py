"""The benchmark scripts at tiny sizes (the benchmark itself is not a test): they run and report ratios."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_model_speed_ratio_and_flops():
    import model_speed
    r = model_speed.compare("vit_tiny", batch=1, steps=1, warmup=0, device="cpu", compile_=False, crop=32)
    assert r["hiend_over_mae_step_time"] > 0
    assert r["hiend"]["stages"] == 3 and r["mae"]["stages"] == 0
    assert r["hiend"]["fwd_gmacs_per_crop"] < r["mae"]["fwd_gmacs_per_crop"]


def test_finetune_speed_tiny():
    import finetune_speed
    inputs = json.loads((BENCH / "gpu" / "finetune_inputs.json").read_text())
    r = finetune_speed.run(inputs, torch.device("cpu"), "vit_tiny", quick=True, steps=1, compile_=False,
                           quick_tile=32)
    nets = r["networks"]
    assert set(nets) == {"nnunet_plainconvunet", "unetr_vit_tiny"}
    assert all(n["tiles_per_case"] == 8 and n["train_step_s"] > 0 for n in nets.values())
    assert r["unetr_over_nnunet_infer_case"] > 0


def test_monai_pipeline_draws_tissue_and_air(tmp_path):
    pytest.importorskip("monai")
    nib = pytest.importorskip("nibabel")
    import monai_loader
    vol = np.full((80, 70, 40), -1000, np.int16)  # air, with a body of soft tissue and a lung of air inside
    vol[10:70, 10:60, :] = 40
    vol[30:50, 20:40, 10:30] = -900
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 3.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    loader = monai_loader.make_loader([tmp_path / "ct.nii.gz"], workers=0, passes=1)
    batch = next(iter(loader))["image"]
    assert tuple(batch.shape) == (8, 1, 96, 96, 96)
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.3  # window [0, 1], then scale/shift jitter


def test_run_prints_summary_last(tmp_path, capsys):
    import run
    code = run.main(["--parts", "model", "--presets", "vit_tiny", "--batch", "1", "--steps", "1", "--warmup", "0",
                     "--out", str(tmp_path), "--device", "cpu"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and last["hiend_over_mae_step_time"] > 0
    assert "loader_over_monai_crops_per_s" in last
    assert (tmp_path / "benchmark_results.json").is_file()
