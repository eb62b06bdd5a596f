"""UNETR: sizes, patch sizes, nnU-Net's calling convention, and the pretrained encoder inside it."""
import pydoc

import pytest
import torch

from himae_nnunet.checkpoint.format import make_meta, read_checkpoint, save_checkpoint
from himae_nnunet.core.errors import UserError
from himae_nnunet.models import HiEndMAE, UNETR, model_config
from himae_nnunet.models.unetr import upsampling_factors


@pytest.mark.parametrize("size,patch,decoder", [
    ((96, 96, 96), 16, "ours"), ((128, 128, 128), 16, "ours"), ((64, 160, 160), 16, "ours"), ((96, 96, 96), 12, "ours"),
    ((48, 72, 96), 12, "ours"), ((64, 64, 64), 8, "ours"),
    ((96, 96, 96), 12, "authors"), ((48, 72, 96), 12, "authors"), ((64, 32, 48), 16, "authors"),
    ((64, 64, 64), 8, "authors")])
def test_forward_backward(size, patch, decoder):
    torch.manual_seed(0)
    net = UNETR(input_channels=1, num_classes=3, deep_supervision=False, preset="vit_tiny",
                patch_size_voxels=size, feature_size=4, patch_size=patch, depth=4, taps=(0, 1, 2), decoder=decoder,
                keep_cls_token=decoder == "ours")
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


@pytest.mark.parametrize("decoder", ["ours", "authors"])
def test_same_parameters_for_training_and_inference(decoder):
    """What training builds is what inference rebuilds and loads strictly (both without deep supervision)."""
    a = UNETR(1, 2, False, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4, decoder=decoder)
    b = UNETR(1, 2, False, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4, decoder=decoder)
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


def test_decoder_topologies():
    """Ours splits p = 12 as 3*2*2*1 with affine norms; the authors' go x2 three times, then resize + 3x3 conv."""
    ours = UNETR(1, 2, preset=None, patch_size=12, embed_dim=96, depth=4, num_heads=4, decoder_dim=48,
                 decoder_heads=4, taps=(0, 1, 2), patch_size_voxels=(48, 48, 48), feature_size=4).decoder
    theirs = UNETR(1, 2, preset=None, patch_size=12, embed_dim=96, depth=4, num_heads=4, decoder_dim=48,
                   decoder_heads=4, taps=(0, 1, 2), patch_size_voxels=(48, 48, 48), feature_size=4,
                   decoder="authors").decoder
    assert [ours.up4.up.stride, ours.up3.up.stride, ours.up2.up.stride, ours.up1.up.stride] == [(3,) * 3, (2,) * 3,
                                                                                               (2,) * 3, (1,) * 3]
    assert [theirs.up4.up.stride, theirs.up3.up.stride, theirs.up2.up.stride] == [(2,) * 3] * 3
    assert theirs.up1.up.kernel_size == (3, 3, 3) and theirs.up1.up.bias is not None
    assert ours.up1.block.norm1.weight is not None and theirs.up1.block.norm1.weight is None
    with pytest.raises(ValueError, match="decoder 'ours'"):
        UNETR(1, 2, preset="vit_tiny", patch_size=4, patch_size_voxels=(16, 16, 16), decoder="authors")
    with pytest.raises(ValueError, match="'mine' is not one of ours, authors"):
        UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(32, 32, 32), decoder="mine")


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
