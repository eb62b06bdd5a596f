"""Checkpoint format: plain data under weights_only, atomic writes, clear refusals."""
import os
import subprocess
import sys

import pytest
import torch

import himae_nnunet
from himae_nnunet.checkpoint.format import CheckpointError, make_meta, read_checkpoint, save_checkpoint
from himae_nnunet.models import HiEndMAE, model_config


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = HiEndMAE(model_config("vit_tiny", stages=2, mask_ratio=0.9, crop_size=48))
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model.state_dict(), make_meta(model.config, step=12, data=["Dataset501_Test"],
                                                        spacing=(2.0, 1.5, 1.5)))
    return path, model


def test_roundtrip_and_metadata(tiny_ckpt):
    path, model = tiny_ckpt
    raw = torch.load(path, weights_only=True)
    meta = raw["meta"]
    assert meta["preset"] == "vit_tiny" and meta["method"] == "hiend" and meta["stages"] == 2
    assert meta["mask_ratio"] == 0.9 and meta["step"] == 12 and meta["crop_size"] == [48, 48, 48]
    assert meta["spacing"] == [2.0, 1.5, 1.5] and meta["intensity_window"] == [-175.0, 250.0]
    assert meta["data"] == ["Dataset501_Test"] and meta["package_version"] == himae_nnunet.__version__
    loaded = himae_nnunet.load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(1, 1, 48, 48, 48)
    perm = loaded.random_permutation(1)
    with torch.no_grad():
        assert torch.equal(loaded(x, perm).decoder_out, model.eval()(x, perm).decoder_out)


def test_no_temporary_file_left(tiny_ckpt):
    path, _ = tiny_ckpt
    assert sorted(os.listdir(path.parent)) == ["tiny.pt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_pickled_code_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "himae-nnunet", "state_dict": {}, "meta": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load .*evil.pt"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned_marker").exists()


def test_damaged_and_foreign_files(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pt as a torch checkpoint"):
        read_checkpoint(cut)
    foreign = tmp_path / "authors.pth"
    torch.save({"state_dict": {"module.encoder.blocks.0.norm1.weight": torch.ones(3)}}, foreign)
    with pytest.raises(CheckpointError, match="import-official"):
        read_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def test_cli_error_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "himae_nnunet.cli", "import-official", str(tmp_path / "nope.pth"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
