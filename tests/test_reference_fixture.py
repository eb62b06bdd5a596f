"""The authors' numerical ground truth, reproduced through `himae-nnunet import-official` + load_checkpoint."""
import json
import subprocess
import sys

import pytest
import torch

import himae_nnunet
from himae_nnunet.checkpoint.official import official_key_to_ours
from himae_nnunet.checkpoint.format import read_checkpoint
from himae_nnunet.models import HiEndMAE, model_config

TOL = 1e-5


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from conftest import FIXTURES, need_shared
    src = need_shared(FIXTURES / "official_tiny")
    out = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    cmd = [sys.executable, "-m", "himae_nnunet.cli", "import-official", str(src / "reference_checkpoint.pth"),
           str(out), "--config", str(src / "config.json")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "decoder_pos_embed" in res.stdout  # the one dropped key is named
    model = himae_nnunet.load_checkpoint(out)
    ref = torch.load(src / "reference_outputs.pt", weights_only=True)
    with torch.no_grad():
        result = model(ref["input"], ref["shuffle_indices"])
    return out, model, ref, result


def test_encoder_states(imported):
    _, _, ref, out = imported
    assert (torch.stack(out.hidden_states) - ref["hidden_states"]).abs().max() < TOL
    assert (out.encoder_out - ref["encoder_out"]).abs().max() < TOL


def test_decoder_loss_reconstruction(imported):
    _, model, ref, out = imported
    assert out.decoder_out.shape == ref["decoder_out"].shape
    assert (out.decoder_out - ref["decoder_out"]).abs().max() < TOL
    assert abs(out.loss.item() - ref["loss"].item()) < TOL
    assert (model.reconstruct_patches(ref["input"], out) - ref["reconstruction"]).abs().max() < TOL


def test_wrong_permutation_changes_output(imported):
    """Guards the test above: the comparison is sensitive to the token order."""
    _, model, ref, _ = imported
    with torch.no_grad():
        out = model(ref["input"], ref["shuffle_indices"].flip(1))
    assert (out.decoder_out - ref["decoder_out"]).abs().max() > 1e-2


def test_imported_metadata(imported):
    path, _, _, _ = imported
    ckpt = torch.load(path, weights_only=True)  # plain data only
    meta = ckpt["meta"]
    assert meta["model"]["embed_dim"] == 96 and meta["model"]["num_heads"] == 4
    assert meta["crop_size"] == [48, 48, 48] and meta["stages"] == 3 and meta["method"] == "hiend"
    assert meta["spacing"] == [1.5, 1.5, 1.5] and meta["intensity_window"] == [-175.0, 250.0]
    assert meta["package_version"] == himae_nnunet.__version__
    assert read_checkpoint(path)["state_dict"].keys() == ckpt["state_dict"].keys()


def test_released_key_list_maps_completely(fixtures_dir):
    """Every key of the authors' released p12/1536 checkpoint maps onto our vit_b12_1536 with its shape."""
    rows = [line.split("\t") for line in (fixtures_dir / "official_keys_vit_p12_1536.tsv").read_text().splitlines()]
    theirs = {k: tuple(int(s) for s in shape.split("x")) for k, shape in rows}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in HiEndMAE(model_config("vit_b12_1536")).state_dict().items()}
    mapped = {official_key_to_ours(k, 3): shape for k, shape in theirs.items()}
    dropped = [k for k in theirs if official_key_to_ours(k, 3) is None]
    assert dropped == ["module.decoder_pos_embed"]
    mapped.pop(None)
    assert set(mapped) == set(ours)
    assert {k: s for k, s in mapped.items() if ours[k] != s} == {}
    encoder_keys = [k for k in theirs if k.startswith("module.encoder.")]
    assert len(encoder_keys) == 2 + 12 * 12 + 2 + 1  # cls, patch embed w/b, 12 blocks x 12, norm w/b


def test_import_rejects_mismatched_file(tmp_path, fixtures_dir):
    sd = torch.load(fixtures_dir / "official_tiny" / "reference_checkpoint.pth", weights_only=True)["state_dict"]
    sd = dict(sd)
    del sd["module.encoder.blocks.3.attn.qkv.weight"]
    sd["module.encoder.extra.weight"] = torch.zeros(3)
    sd["module.decoder.head.bias"] = torch.zeros(5)
    src = tmp_path / "broken.pth"
    torch.save({"state_dict": sd}, src)
    out = tmp_path / "out.pt"
    res = subprocess.run([sys.executable, "-m", "himae_nnunet.cli", "import-official", str(src), str(out),
                          "--config", str(fixtures_dir / "official_tiny" / "config.json")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "missing (1): encoder.blocks.3.attn.qkv.weight" in res.stderr
    assert "unexpected (1): encoder.extra.weight" in res.stderr
    assert "mis-shaped (1): decoder.head.bias" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_import_needs_heads_when_no_preset_matches(tmp_path, fixtures_dir):
    out = tmp_path / "x.pt"
    res = subprocess.run([sys.executable, "-m", "himae_nnunet.cli", "import-official",
                          str(fixtures_dir / "official_tiny" / "reference_checkpoint.pth"), str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--num-heads" in res.stderr and not out.exists()
    res = subprocess.run([sys.executable, "-m", "himae_nnunet.cli", "import-official",
                          str(fixtures_dir / "official_tiny" / "reference_checkpoint.pth"), str(out),
                          "--num-heads", "4", "--decoder-heads", "4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(json.dumps(torch.load(out, weights_only=True)["meta"]))["model"]["crop_size"] == [48] * 3
