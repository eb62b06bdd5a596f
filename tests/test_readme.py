"""The README's workflow, run literally: its bash block, in a fresh folder, with real CT scans as `scans/`."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, REPO, need_shared


def workflow_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The workflow for nnU-Net users"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_commands_exist():
    """Each `himae-nnunet X` the README shows is a real subcommand."""
    from himae_nnunet.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    shown = set(re.findall(r"himae-nnunet ([a-z][a-z-]+)", (REPO / "README.md").read_text()))
    assert shown - set(sub.choices) == set()


def test_readme_workflow_runs_literally(tmp_path):
    need_shared(DATA)
    scans = tmp_path / "scans"
    scans.mkdir()
    # unlabelled scans of three formats, mixed in one folder
    shutil.copy(DATA / "ct_abdomen_ts_small" / "example_ct_sm.nii.gz", scans / "abdomen.nii.gz")
    shutil.copy(DATA / "ct_spleen_msd" / "sub-spleen2_ct.nii.gz", scans / "spleen.nii.gz")
    shutil.copytree(DATA / "ct_abdomen_ts_dicom" / "dicom", scans / "dicom_series")
    script = tmp_path / "workflow.sh"
    script.write_text("set -euo pipefail\n" + workflow_block())
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", nnUNet_compile="f",
               nnUNet_n_proc_DA="1", OMP_NUM_THREADS="1")  # 0 breaks nnU-Net planning
    res = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "runs" / "hiend" / "checkpoint_final.pt").is_file()
    summary = json.loads((tmp_path / "predictions" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3"}
    assert len(list((tmp_path / "predictions").glob("*.nii.gz"))) == 2
    imported = tmp_path / "nnUNet_raw" / "Dataset501_Unlabelled" / "imagesTr"
    assert len(list(imported.glob("*_0000.nii.gz"))) == 3
