"""The real-CT nnU-Net chain shared by the end-to-end tests (built once per session by conftest's `chain`):
patient A trains, patient B (from DICOM) validates; baseline plans and data, ViT plans and data, the A -> B fold.
Also the command runner the chain tests use (the stock console scripts beside this interpreter)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from himae_nnunet.scans.oneshot_dataset import write_ab_dataset
from test_plan import tiny_checkpoint

BIN = Path(sys.executable).parent
PLANS = "HiEndMAEPlans"


def run(*cmd, env=None, stdout_only=False, fails=False) -> str:
    proc = subprocess.run([str(BIN / cmd[0]), *map(str, cmd[1:])], env=env, capture_output=True, text=True,
                          timeout=1800)
    out = proc.stdout + proc.stderr
    assert (proc.returncode != 0) == fails, f"{' '.join(map(str, cmd))} exit {proc.returncode}:\n{out[-4000:]}"
    return proc.stdout if stdout_only else out


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def tree_env(root: Path) -> dict:
    """A fresh nnU-Net folder tree under `root` and the environment of the chain tests for it (no
    nnUNet_extTrainer: the tests add it where they mean to)."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        env[var] = str(root / var)
    return env | dict(nnUNet_compile="f", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")


def build_chain(data: Path, root: Path) -> dict:
    """Dataset, baseline plans and data, ViT plans and data, the A -> B fold; env without nnUNet_extTrainer."""
    env = tree_env(root)
    raw = write_ab_dataset(data, root / "nnUNet_raw")
    ckpt, _ = tiny_checkpoint(root / "tiny.pt", crop=48)  # pretraining grid 3^3, fine-tuning grid 2^3
    run("nnUNetv2_plan_and_preprocess", "-d", 501, "-c", "3d_fullres", "-np", 1, "--verify_dataset_integrity", env=env)
    pre = root / "nnUNet_preprocessed" / raw.name
    baseline = digests(pre / "nnUNetPlans_3d_fullres") | {"plans": digests(pre)["nnUNetPlans.json"]}
    out = run("himae-nnunet", "plan", 501, "--checkpoint", ckpt, "--patch-size", 32, 32, 32, "--feature-size", 8,
              "--layer-decay", 0.5, "--freeze-encoder-epochs", 1, env=env)
    assert "export nnUNet_extTrainer=" in out  # not set in env: the exact line to run is printed
    assert "splits the batch of 2 over N GPUs, so N must divide it (here N = 1, 2)" in out
    run("nnUNetv2_preprocess", "-d", 501, "-plans_name", PLANS, "-c", "3d_fullres", "-np", 1, env=env)
    out = run("himae-nnunet", "split", 501, "--cases", "patientA", env=env)
    assert "fold 0: train 1 [patientA], val 1" in out
    env["nnUNet_n_proc_DA"] = "0"  # training: augmentation in the main process (planning needs it > 0)
    ext = run("himae-nnunet", "ext-trainer-path", env=env, stdout_only=True).strip()
    return dict(root=root, env=env, env_ext=env | {"nnUNet_extTrainer": ext}, raw=raw, pre=pre, ckpt=ckpt,
                baseline=baseline)
