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


def test_files_that_are_no_checkpoint_are_named_as_such(tmp_path, tiny_ckpt, data_dir):
    """Random bytes, a cut-off download, an image renamed .pt: 'damaged or not a checkpoint', never the
    pickled-code refusal (which would send the user looking for an attack)."""
    import gzip
    import shutil
    from himae_nnunet.vit_plans.weights import read_pretrained
    path, _ = tiny_ckpt
    nifti = tmp_path / "scan.pt"
    shutil.copy(data_dir / "ct_spleen_msd" / "sub-spleen2_ct.nii.gz", nifti)
    plain_nifti = tmp_path / "scan_nii.pt"
    plain_nifti.write_bytes(gzip.decompress(nifti.read_bytes())[:4096])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:2] + b"garbage after the pickle header")
    cut = tmp_path / "half.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = {nifti: "not a torch file: it looks like a gzip-compressed file (a .nii.gz image?)",
             plain_nifti: "not a torch file: it looks like a NIfTI-1 image",
             noise: "not a torch file: its first bytes (",
             legacy: "UnpicklingError: the data after the header is not a pickle",
             cut: "RuntimeError: PytorchStreamReader failed",
             empty: "not a torch file: the file is empty"}
    for bad, why in cases.items():
        for reader in (read_checkpoint, read_pretrained):
            with pytest.raises(CheckpointError) as e:
                reader(bad)
            message = str(e.value)
            assert message.startswith(f"cannot read {bad} as a torch checkpoint (") and why in message, message
            assert "the file is damaged or not a checkpoint" in message and "pickled" not in message
