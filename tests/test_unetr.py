"""UNETR: sizes, patch sizes, nnU-Net's calling convention, and the pretrained encoder inside it."""
import pydoc

import pytest
import torch

from himae_nnunet.checkpoint.format import make_meta, read_checkpoint, save_checkpoint
from himae_nnunet.core.errors import UserError
from himae_nnunet.models import HiEndMAE, UNETR, model_config
from himae_nnunet.models.unetr import upsampling_factors


@pytest.mark.parametrize("size,patch", [((96, 96, 96), 16), ((128, 128, 128), 16), ((64, 160, 160), 16),
                                        ((96, 96, 96), 12), ((48, 72, 96), 12), ((64, 64, 64), 8)])
def test_forward_backward(size, patch):
    torch.manual_seed(0)
    net = UNETR(input_channels=1, num_classes=3, deep_supervision=False, preset="vit_tiny",
                patch_size_voxels=size, feature_size=4, patch_size=patch, depth=4, taps=(0, 1, 2))
    x = torch.rand(1, 1, *size)
    y = net(x)
    assert y.shape == (1, 3, *size)
    y.float().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_nnunet_calling_convention_and_names():
    cls = pydoc.locate("himae_nnunet.models.unetr.UNETR")
    net = cls(input_channels=2, num_classes=4, deep_supervision=False, preset="vit_tiny",
              patch_size_voxels=[32, 32, 32], feature_size=4)
    keys = net.state_dict().keys()
    assert {k for k in keys if ".seg_layers." in f".{k}"} == {"decoder.seg_layers.weight", "decoder.seg_layers.bias"}
    assert net(torch.rand(1, 2, 32, 32, 32)).shape == (1, 4, 32, 32, 32)  # no deep-supervision list


def test_stock_deep_supervision_is_refused_naming_our_trainers():
    with pytest.raises(UserError, match="trains only with our trainers: -tr nnUNetTrainerHiEndMAE"):
        UNETR(1, 2, True, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4)
    net = UNETR(1, 2, False, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4)
    assert net.decoder.deep_supervision is False
    with pytest.raises(UserError, match="stock nnU-Net trainer set decoder.deep_supervision"):
        net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does


def test_same_parameters_for_training_and_inference():
    a = UNETR(1, 2, False, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4)
    b = UNETR(1, 2, False, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict(), strict=True)


def test_encoder_keys_match_pretraining():
    mae = HiEndMAE(model_config("vit_tiny"))
    net = UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(96, 96, 96))
    enc_keys = {k for k in net.state_dict() if k.startswith("encoder.")}
    assert enc_keys == {k for k in mae.state_dict() if k.startswith("encoder.")}


def test_pretrained_encoder_gives_same_features(tmp_path):
    torch.manual_seed(0)
    mae = HiEndMAE(model_config("vit_tiny", crop_size=64))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, mae.state_dict(), make_meta(mae.config, step=7))
    sd = read_checkpoint(path)["state_dict"]
    net = UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(64, 64, 64)).eval()
    net.load_state_dict({**net.state_dict(), **{k: v for k, v in sd.items() if k.startswith("encoder.")}})
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        ref, ref_hidden = mae.eval().encoder(x)
        got, got_hidden = net.encode(x)
    assert (ref - got).abs().max() < 1e-6
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(ref_hidden, got_hidden))


def test_drop_cls_variant():
    net = UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4, keep_cls_token=False)
    final, hidden = net.encode(torch.rand(1, 1, 32, 32, 32))
    assert final.shape == (1, 8, 96) and hidden[0].shape == (1, 8, 96)


def test_upsampling_factors():
    assert upsampling_factors(16) == (2, 2, 2, 2)
    assert upsampling_factors(12) == (3, 2, 2, 1)
    assert upsampling_factors(8) == (2, 2, 2, 1)
    with pytest.raises(ValueError):
        upsampling_factors(11)


def test_wrong_input_size_is_reported():
    net = UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4)
    with pytest.raises(ValueError, match=r"built for input \(32, 32, 32\)"):
        net(torch.rand(1, 1, 48, 48, 48))
