"""`himae-nnunet analyze`: effective rank maths, attention recomputation, and the three analyses end to end
on the real CTs of ../shared/data with two briefly trained vit_tiny checkpoints (MAE B = 0, Hi-End-MAE B = 3)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from himae_nnunet.analysis.attention import token_of_voxel
from himae_nnunet.analysis.probe import attention_probs, capture_qkv, split_heads
from himae_nnunet.analysis.rank import effective_rank, singular_values_from_gram
from himae_nnunet.analysis.volumes import crop_around, inside_mask, load_image_volume, sample_crops
from himae_nnunet.checkpoint.format import load_checkpoint, make_meta, save_checkpoint
from himae_nnunet.cli import main
from himae_nnunet.models.hiend_mae import HiEndMAE
from himae_nnunet.models.presets import model_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CT_FULL = DATA / "ct_abdomen_ts_full" / "example_ct.nii.gz"
SEG_FULL = DATA / "ct_abdomen_ts_full" / "example_seg_fast_force_split.nii.gz"
DICOM = DATA / "ct_abdomen_ts_dicom" / "dicom"
LIVER = 5


# ---------------------------------------------------------------- maths

def test_effective_rank_of_known_matrices():
    n = 17
    assert effective_rank(torch.linalg.svdvals(torch.eye(n))) == pytest.approx(math.log(n), abs=1e-9)
    u, v = torch.randn(40, 1, dtype=torch.float64), torch.randn(1, 30, dtype=torch.float64)
    assert effective_rank(torch.linalg.svdvals(u @ v)) == pytest.approx(0.0, abs=1e-9)
    # two equal singular values and zeros: log 2; scale does not matter
    assert effective_rank([3.0, 3.0, 0.0, 0.0]) == pytest.approx(math.log(2))
    assert effective_rank([1.0, 2.0, 3.0]) == pytest.approx(effective_rank([10.0, 20.0, 30.0]))


def test_singular_values_from_gram_equal_svd():
    a = torch.randn(300, 24, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, 24, dtype=torch.float64))
    s = singular_values_from_gram(a.T @ a)
    assert torch.allclose(s, torch.linalg.svdvals(a), rtol=1e-6, atol=1e-9)
    assert (s[:-1] >= s[1:]).all()


def test_recomputed_attention_reproduces_the_fused_block():
    model = HiEndMAE(model_config("vit_tiny", crop_size=32)).eval()
    block = model.encoder.blocks[2]
    x = torch.rand(2, 1, 32, 32, 32)
    seen = {}
    block.norm1.register_forward_hook(lambda m, i, o: seen.setdefault("in", o))
    block.attn.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with capture_qkv(model.encoder, [2]) as store, torch.no_grad():
        model.encoder(x)
    probs = attention_probs(store[2], block.attn)
    assert probs.shape == (2, 4, 9, 9)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 9))
    _, _, v = split_heads(store[2], 4)
    out = block.attn.proj((probs @ v).transpose(1, 2).reshape(2, 9, -1))
    assert torch.allclose(out, seen["out"], atol=1e-5)


def test_recomputed_attention_reproduces_primus_eva_blocks_with_rope():
    """The probe reads Primus' separate q/k/v projections and applies the rotary embedding as the block does."""
    from himae_nnunet.analysis.probe import encoder_rope
    from himae_nnunet.analysis.rank import value_spectra
    model = HiEndMAE(model_config("primus_tiny", crop_size=32)).eval()
    attn = model.encoder.blocks[2].attn
    with torch.no_grad():  # peaked attention (at init it is nearly uniform, with or without rope)
        attn.q_proj.weight.mul_(20)
        attn.k_proj.weight.mul_(20)
    x = torch.rand(2, 1, 32, 32, 32)
    seen = {}
    attn.register_forward_hook(lambda m, i, o: seen.update(out=o) if "out" not in seen else None)
    with capture_qkv(model.encoder, [2]) as store, torch.no_grad():
        model.encoder(x)
    probs = attention_probs(store[2], attn, encoder_rope(model.encoder))
    assert probs.shape == (2, 4, 64, 64)
    _, _, v = split_heads(store[2], 4)
    out = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(2, 64, -1)))  # EVA: normed attention output
    assert torch.allclose(out, seen["out"], atol=1e-5)
    without_rope = attention_probs(store[2], attn)
    assert not torch.allclose(attn.proj(attn.norm((without_rope @ v).transpose(1, 2).reshape(2, 64, -1))),
                              seen["out"], atol=1e-3)
    layers = value_spectra(model, torch.rand(3, 32, 32, 32).numpy())
    assert len(layers) == 8 and all(l["rows"] == 3 * 64 for l in layers)


def test_token_of_voxel_follows_patchify_order():
    model = HiEndMAE(model_config("vit_tiny", crop_size=(32, 48, 64)))  # grid 2 x 3 x 4
    x = torch.zeros(1, 1, 32, 48, 64)
    x[0, 0, 20, 35, 50] = 1
    from himae_nnunet.models.vit import patchify
    assert patchify(x, 16)[0].sum(-1).argmax().item() == token_of_voxel(model, (20, 35, 50))


def test_crop_around_pads_small_volumes_and_keeps_the_centre():
    vol = np.arange(10 * 50 * 60, dtype=np.float32).reshape(10, 50, 60)
    crop, start = crop_around(vol, (5, 45, 2), (16, 16, 16))
    assert crop.shape == (16, 16, 16)
    assert start == (-3, 34, 0)
    assert crop[5 - start[0], 45 - start[1], 2 - start[2]] == vol[5, 45, 2]
    assert (crop[:3] == 0).all() and (crop[13:] == 0).all()  # padded slices
    inside = inside_mask(vol.shape, start, crop.shape)
    assert inside.sum() == 10 * 16 * 16 and not inside[:3].any() and inside[3:13].all()


def test_scans_are_reoriented_to_lps_for_display(data_dir):
    """example_ct's header has direction diag(-1, -1, 1): the model-space array is the stored one flipped
    in y and x (at the scan's own 3 mm spacing no interpolation happens)."""
    import SimpleITK as sitk
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(CT_FULL))).astype(np.float32)
    vol = load_image_volume(CT_FULL, (3.0, 3.0, 3.0), (-175.0, 250.0))
    expected = (np.clip(stored[:, ::-1, ::-1], -175, 250) + 175) / 425
    np.testing.assert_allclose(vol.array, expected, atol=1e-5)


# ---------------------------------------------------------------- real CTs, two small checkpoints

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """MAE (B = 0) and Hi-End-MAE (B = 3) vit_tiny checkpoints, 8 AdamW steps each on real crops."""
    if not DATA.exists():
        pytest.skip(f"{DATA} is absent")
    torch.manual_seed(0)
    vol = load_image_volume(CT_FULL, (1.5,) * 3, (-175.0, 250.0))
    crops = torch.from_numpy(sample_crops([vol], 8, (96,) * 3, seed=1))[:, None]
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for name, stages in (("mae", 0), ("hiend", 3)):
        model = HiEndMAE(model_config("vit_tiny", stages=stages))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(8):
            loss = model(crops[2 * (step % 4):2 * (step % 4) + 2]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        paths.append(folder / f"{name}.pt")
        save_checkpoint(paths[-1], model.state_dict(), make_meta(model.config, step=8))
    return paths


def png_shows_something(path: Path, scan: bool = True) -> None:
    """Written and not blank; figures of scans are mostly image (not white background), and much of it gray."""
    import matplotlib.image
    assert path.is_file(), path
    img = matplotlib.image.imread(path)[..., :3]
    assert img.std() > 0.05, f"{path} looks blank"
    if scan:
        assert (img.mean(-1) < 0.9).mean() > 0.3, f"{path} is mostly white"


def test_rank_on_real_ct(checkpoints, tmp_path, capsys):
    out = tmp_path / "rank"
    assert main(["analyze", "rank", *map(str, checkpoints), "--image", str(CT_FULL), "--output", str(out),
                 "--crops", "6", "--device", "cpu"]) == 0
    report = json.loads((out / "rank.json").read_text())
    assert [c["name"] for c in report["checkpoints"]] == ["mae", "hiend"]
    assert [c["stages"] for c in report["checkpoints"]] == [0, 3]
    for ckpt in report["checkpoints"]:
        assert [l["layer"] for l in ckpt["layers"]] == list(range(12))
        for layer in ckpt["layers"]:
            s = np.array(layer["singular_values"])
            assert s.shape == (96,) and (s >= 0).all() and (np.diff(s) <= 1e-12).all()
            assert layer["rows"] == 6 * 216
            assert 0 < layer["effective_rank"] <= math.log(96) + 1e-9
            assert layer["effective_rank"] == pytest.approx(effective_rank(s), rel=1e-9)
            assert 0 < layer["effective_rank_per_crop_mean"] <= math.log(96)
    ranks = [[l["effective_rank"] for l in c["layers"]] for c in report["checkpoints"]]
    assert not np.allclose(ranks[0], ranks[1])  # two different encoders, two different curves
    assert "effective rank of V per block" in capsys.readouterr().out
    for png in ("rank_effective.png", "rank_singular_values.png"):
        png_shows_something(out / png, scan=False)


def test_attention_at_the_liver_centre(checkpoints, tmp_path):
    out = tmp_path / "attention"
    assert main(["analyze", "attention", *map(str, checkpoints), "--image", str(CT_FULL), "--label-map",
                 str(SEG_FULL), "--query-label", str(LIVER), "--output", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "attention.json").read_text())
    vol = load_image_volume(CT_FULL, (1.5,) * 3, (-175.0, 250.0), SEG_FULL)
    for ckpt in report["checkpoints"]:
        assert vol.labels[tuple(ckpt["query_voxel_model_space"])] == LIVER
        assert sorted(ckpt["blocks"], key=int) == ["3", "6", "9", "11"]  # taps and the last block
        maps = np.load(out / f"attention_{ckpt['name']}.npz")
        assert tuple(maps["query_voxel"]) == tuple(ckpt["query_voxel_in_crop"])
        assert maps["crop"].shape == (96, 96, 96) and 0 <= maps["crop"].min() and maps["crop"].max() <= 1
        for b, stats in ckpt["blocks"].items():
            m = maps[f"block{b}"]
            assert m.shape == (4, 216) and (m >= 0).all()
            np.testing.assert_allclose(m.sum(1) + np.array(stats["cls_share"]), 1.0, atol=1e-5)
            assert all(0 <= e <= math.log(216) + 1e-6 for e in stats["entropy"])
        for mode in ("slice", "mip"):
            png_shows_something(out / f"attention_{ckpt['name']}_{mode}.png")
    png_shows_something(out / "attention_compare.png")


def test_reconstruct_on_a_dicom_series_at_a_query_voxel(checkpoints, tmp_path):
    out = tmp_path / "reconstruct"
    assert main(["analyze", "reconstruct", *map(str, checkpoints), "--image", str(DICOM), "--query", "256", "300",
                 "10", "--mask-ratios", "0.5", "0.9", "--output", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "reconstruct.json").read_text())
    for ckpt in report["checkpoints"]:
        # (x 256, y 300, z 10) at 0.977 x 0.977 x 2 mm -> about (z 13, y 195, x 167) at 1.5 mm
        assert np.allclose(ckpt["query_voxel_model_space"], (13, 195, 167), atol=1.5)
        assert [r["mask_ratio"] for r in ckpt["ratios"]] == [0.5, 0.9]
        assert [r["num_visible"] for r in ckpt["ratios"]] == [108, 21]
        for r in ckpt["ratios"]:
            assert 0 < r["masked_mse"] < 0.2 and np.isfinite(r["loss"])
        png_shows_something(out / f"reconstruct_{ckpt['name']}.png")
    assert load_checkpoint(checkpoints[1]).config["mask_ratio"] == 0.75


def test_bad_queries_and_ratios_are_user_errors(checkpoints, tmp_path, capsys):
    base = ["--image", str(CT_FULL), "--output", str(tmp_path), "--device", "cpu"]
    assert main(["analyze", "attention", str(checkpoints[0]), *base, "--label-map", str(SEG_FULL),
                 "--query-label", "999"]) == 2
    assert "label 999 does not occur" in capsys.readouterr().err
    assert main(["analyze", "attention", str(checkpoints[0]), *base, "--query", "500", "0", "0"]) == 2
    assert "outside the scan" in capsys.readouterr().err
    assert main(["analyze", "reconstruct", str(checkpoints[0]), *base, "--mask-ratios", "1.0"]) == 2
    assert "must be in [0, 1)" in capsys.readouterr().err
    assert main(["analyze", "attention", str(checkpoints[0]), *base, "--blocks", "12"]) == 2
    assert "outside 0..11" in capsys.readouterr().err


def test_dataset_source_picks_the_pretraining_data(checkpoints, nnunet_dirs, tmp_path, capsys):
    """An nnU-Net preprocessed dataset with two data folders: the one at the checkpoint's spacing is read."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    root = nnunet_dirs["nnUNet_preprocessed"] / "Dataset901_Analysis"
    vol = load_image_volume(CT_FULL, (1.5,) * 3, (-175.0, 250.0), SEG_FULL)
    plans = {"plans_name": "p", "configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "spacing": [3.0, 3.0, 3.0]},
        "3d_vit": {"data_identifier": "vit_1.5mm", "spacing": [1.5, 1.5, 1.5]}}}
    (root / "vit_1.5mm").mkdir(parents=True)
    (root / "nnUNetPlans_3d_fullres").mkdir()
    (root / "p.json").write_text(json.dumps(plans))
    nnUNetDatasetBlosc2.save_case(vol.array[None], vol.labels[None].astype(np.int8), {"spacing": [3.0] * 3},
                                  str(root / "vit_1.5mm" / "caseA"))
    out = tmp_path / "ds"
    assert main(["analyze", "reconstruct", str(checkpoints[1]), "--dataset", "901", "--query-label", str(LIVER),
                 "--mask-ratios", "0.75", "--output", str(out), "--device", "cpu"]) == 0
    ckpt = json.loads((out / "reconstruct.json").read_text())["checkpoints"][0]
    assert ckpt["case"] == "caseA"
    assert vol.labels[tuple(ckpt["query_voxel_model_space"])] == LIVER
    png_shows_something(out / "reconstruct_hiend.png")
    assert main(["analyze", "rank", str(checkpoints[1]), "--dataset", "901", "--data-identifier", "nnUNetPlans_x",
                 "--output", str(out)]) == 2
    assert "nnUNetPlans_x does not exist" in capsys.readouterr().err


def test_flops_doc_is_current():
    """docs/flops.md (written by benchmarks/flops_table.py) has every table preset x B = 0..3, and its vit_tiny rows
    equal a fresh count."""
    from himae_nnunet.models.flops import count, format_table, table_presets
    text = (Path(__file__).resolve().parents[1] / "docs" / "flops.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| vit", "| primus"))]
    assert [tuple(r.split("|")[1:3]) for r in rows] == [(f" {m} ", f" {b} ") for m in table_presets() for b in range(4)]
    fresh = format_table([count("vit_tiny", b) for b in range(4)]).splitlines()[2:]
    assert rows[:4] == fresh
