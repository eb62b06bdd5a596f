"""Shapes, masking, B = 0..3, mask ratios and configuration errors of the pretraining model."""
import pytest
import torch

from himae_nnunet.models import HiEndMAE, ConfigError, model_config, patchify, unpatchify
from himae_nnunet.models.vit import sincos_pos_embed_3d


def tiny(**kw):
    return model_config("vit_tiny", crop_size=kw.pop("crop_size", 48), **kw)


@pytest.mark.parametrize("stages", [0, 1, 2, 3])
def test_stages_build_the_right_decoder(stages):
    torch.manual_seed(0)
    model = HiEndMAE(tiny(stages=stages))
    assert len(model.decoder.blocks) == 8 - 2 * stages
    assert len(model.decoder.cross_attention_blocks) == stages
    assert len(model.encoder_to_decoder) == 1 + stages
    x = torch.rand(2, 1, 48, 48, 48)
    out = model(x)
    assert out.decoder_out.shape == (2, 1 + 27, 16 ** 3)
    assert out.encoder_out.shape == (2, 1 + 6, 96)  # int(27 * 0.25) = 6 visible
    assert len(out.hidden_states) == 12
    out.loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # DDP without find_unused_parameters needs every parameter used


@pytest.mark.parametrize("ratio,visible", [(0.75, 54), (0.9, 21), (0.95, 10)])
def test_mask_ratio_sets_visible_tokens(ratio, visible):
    model = HiEndMAE(model_config("vit_tiny", mask_ratio=ratio))  # 96^3 / 16 -> 216 tokens
    out = model(torch.rand(1, 1, 96, 96, 96))
    assert out.num_visible == visible and out.encoder_out.shape[1] == 1 + visible


def test_permutations_differ_per_sample_and_are_permutations():
    model = HiEndMAE(tiny())
    perm = model.random_permutation(4, generator=torch.Generator().manual_seed(1))
    assert all(sorted(p.tolist()) == list(range(27)) for p in perm)
    assert len({tuple(p.tolist()) for p in perm}) == 4


def test_visible_gather_equals_full_encoder():
    """Encoding only the gathered tokens equals encoding everything, then reordering (no masking)."""
    torch.manual_seed(0)
    enc = HiEndMAE(tiny()).encoder.eval()
    x = torch.rand(2, 1, 48, 48, 48)
    perm = torch.stack([torch.randperm(27) for _ in range(2)])
    with torch.no_grad():
        full, _ = enc(x)
        gathered, _ = enc(x, perm)
    reordered = torch.gather(full[:, 1:], 1, perm[..., None].expand(-1, -1, 96))
    assert (gathered[:, 1:] - reordered).abs().max() < 1e-5
    assert (gathered[:, 0] - full[:, 0]).abs().max() < 1e-5


def test_loss_is_masked_only():
    """Changing only visible positions of the prediction target region does not change the loss."""
    torch.manual_seed(0)
    model = HiEndMAE(tiny()).eval()
    x = torch.rand(1, 1, 48, 48, 48)
    perm = model.random_permutation(1)
    with torch.no_grad():
        base = model(x, perm)
        target = model.normalized_patches(x, perm[:, base.num_visible:])
        direct = ((base.decoder_out[:, 1 + base.num_visible:] - target) ** 2).mean()
    assert torch.allclose(base.loss, direct)
    assert target.mean(-1).abs().max() < 1e-5 and (target.std(-1, unbiased=False) - 1).abs().max() < 1e-2


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 32 * 48 * 16, dtype=torch.float32).reshape(1, 2, 32, 48, 16)
    p = patchify(x, 16)
    assert p.shape == (1, 2 * 3 * 1, 16 ** 3 * 2)
    assert torch.equal(unpatchify(p, 16, (2, 3, 1), 2), x)
    assert p[0, 1, 0] == x[0, 0, 0, 16, 0]  # tokens h-major: token 1 is the next patch along w
    assert p[0, 0, 1] == x[0, 1, 0, 0, 0]  # channel is the fastest value inside a patch


def test_reconstruct_shapes_and_visibility():
    model = HiEndMAE(tiny())
    x = torch.rand(2, 1, 48, 48, 48)
    out = model(x)
    rec, visible = model.reconstruct(x, out)
    assert rec.shape == x.shape and visible.shape == (2, 1, 48, 48, 48)
    assert visible.mean().item() == pytest.approx(6 / 27)


def test_sincos_table_layout():
    t = sincos_pos_embed_3d(12, (2, 3, 4))
    assert t.shape == (24, 12)
    # token 4 = (h 0, w 1, d 0): h part is sin(0)=0, cos(0)=1; w part sin(1), cos(1)
    assert torch.allclose(t[4, :4], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(t[4, 4:6], torch.sin(torch.tensor([1.0, 1.0 / 10000 ** 0.5])))


def test_learnable_position_embedding_is_trained():
    model = HiEndMAE(tiny(pos_embed="learnable"))
    assert isinstance(model.encoder.pos_embed, torch.nn.Parameter)
    model(torch.rand(1, 1, 48, 48, 48)).loss.backward()
    assert model.encoder.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides,message", [
    (dict(embed_dim=100, num_heads=4), "not divisible by 6"),
    (dict(embed_dim=96, num_heads=5), "not divisible by its head count"),
    (dict(decoder_dim=50), "decoder_dim=50 is not divisible by 6"),
    (dict(crop_size=(96, 96, 90)), "not a multiple of the ViT patch size 16"),
    (dict(stages=4), "stages=4"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=0.9, crop_size=32), "leaves no visible token"),
])
def test_configuration_errors_are_clear(overrides, message):
    with pytest.raises(ConfigError, match=message):
        model_config("vit_tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'vit_huge'.*vit_tiny"):
        model_config("vit_huge")
