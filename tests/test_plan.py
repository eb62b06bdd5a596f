"""`himae-nnunet plan`: ViT plans derived from the dataset's nnU-Net plans and a checkpoint."""
import hashlib
import json
import pydoc
from copy import deepcopy

import numpy as np
import pytest
import torch

from himae_nnunet.checkpoint.format import make_meta, save_checkpoint, sha256
from himae_nnunet.cli import main
from himae_nnunet.core.errors import UserError
from himae_nnunet.models import HiEndMAE, model_config
from himae_nnunet.scans.oneshot_dataset import write_ab_dataset
from himae_nnunet.vit_plans.planning import derive_vit_plans


def tiny_checkpoint(path, crop=48, spacing=(3.0, 3.0, 3.0), preset="vit_tiny", **overrides):
    torch.manual_seed(0)
    model = HiEndMAE(model_config(preset, crop_size=(crop,) * 3, **overrides))
    meta = make_meta(model.config, spacing=spacing)
    save_checkpoint(path, model.state_dict(), meta)
    return path, meta


def base_plans(channels=("CTNormalization",), transpose=(0, 1, 2)):
    """The parts of nnU-Net plans that planning reads, shaped as nnU-Net 2.8 writes them."""
    cfg = dict(data_identifier="nnUNetPlans_3d_fullres", preprocessor_name="DefaultPreprocessor", batch_size=2,
               patch_size=[64, 192, 192], median_image_size_in_voxels=[100.0, 300.0, 300.0], spacing=[2.0, 1.0, 1.0],
               normalization_schemes=list(channels), use_mask_for_norm=[False] * len(channels), next_stage="x",
               architecture=dict(network_class_name="dynamic_network_architectures.architectures.unet.PlainConvUNet"))
    props = {str(c): dict(mean=50.0, std=90.0, percentile_00_5=-900.0, percentile_99_5=150.0)
             for c in range(len(channels))}
    return dict(dataset_name="Dataset900_X", plans_name="nnUNetPlans", transpose_forward=list(transpose),
                transpose_backward=[list(transpose).index(i) for i in range(3)], image_reader_writer="SimpleITKIO",
                label_manager="LabelManager",
                configurations={"2d": {}, "3d_fullres": cfg}, foreground_intensity_properties_per_channel=props)


def test_derive_spacing_window_patch():
    meta = make_meta(model_config("vit_tiny"), spacing=(1.0, 1.5, 2.0))  # z, y, x
    plans = derive_vit_plans(base_plans(transpose=(2, 0, 1)), "ck.pt", meta, "abc", "P")
    cfg = plans["configurations"]["3d_fullres"]
    assert list(plans["configurations"]) == ["3d_fullres"] and "next_stage" not in cfg
    assert cfg["spacing"] == [2.0, 1.0, 1.5]  # pretraining z,y,x spacing in the plans' transposed axis order
    assert cfg["data_identifier"] == "P_3d_fullres_zlin" and plans["plans_name"] == "P"
    # default patch: the 96^3 crop grown by whole 16-voxel patches along axes the median image fills
    assert all(s % 16 == 0 and s >= 96 for s in cfg["patch_size"]) and cfg["patch_size"] != [96, 96, 96]
    assert np.prod([s // 16 for s in cfg["patch_size"]]) <= 2 * 6 ** 3
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"]) == (-175, 250, -175, 425)
    assert plans["himae"]["checkpoint_sha256"] == "abc" and plans["himae"]["ct_channels"] == [0]


def test_derive_refusals_and_warnings():
    meta = make_meta(model_config("vit_tiny"))
    with pytest.raises(UserError, match=r"not a multiple of the ViT patch size 16.*\[96, 96, 48\]"):
        derive_vit_plans(base_plans(), "ck.pt", meta, "abc", patch_size=(100, 90, 44))
    warnings = []
    derive_vit_plans(base_plans(), "ck.pt", meta, "abc", spacing=(2, 2, 2), window=(-100, 200), warn=warnings.append)
    assert any("spacing [2.0, 2.0, 2.0] differs from the pretraining spacing [1.5, 1.5, 1.5]" in w for w in warnings)
    assert any("intensity window [-100.0, 200.0] differs" in w for w in warnings)
    with pytest.raises(UserError, match="refused"):
        derive_vit_plans(base_plans(), "ck.pt", meta, "abc", spacing=(2, 2, 2), strict=True)
    # a second, non-CT channel keeps its own normalization; no CT channel at all is warned about
    plans = derive_vit_plans(base_plans(("CTNormalization", "ZScoreNormalization")), "ck.pt", meta, "abc")
    assert plans["foreground_intensity_properties_per_channel"]["1"]["mean"] == 50.0
    warnings = []
    derive_vit_plans(base_plans(("ZScoreNormalization",)), "ck.pt", meta, "abc", warn=warnings.append)
    assert any("no channel uses CTNormalization" in w for w in warnings)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_command(nnunet_dirs, data_dir, tmp_path, monkeypatch, capsys):
    import nnunetv2.configuration
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    write_ab_dataset(data_dir, nnunet_dirs["nnUNet_raw"])
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    args = ["plan", "501", "--checkpoint", str(ckpt), "--patch-size", "32", "32", "32"]
    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 1)  # nnUNet_def_n_proc=1
    assert main(args) == 0  # base plans missing: nnU-Net fingerprinting and planning run first, -np as nnU-Net's
    out = capsys.readouterr().out
    assert "export nnUNet_extTrainer=" in out and "nnUNetv2_preprocess -d 501 -plans_name HiEndMAEPlans" in out
    folder = nnunet_dirs["nnUNet_preprocessed"] / "Dataset501_OneShotAB"
    base_digest = digest(folder / "nnUNetPlans.json")
    plans = json.loads((folder / "HiEndMAEPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert plans["plans_name"] == "HiEndMAEPlans" and cfg["spacing"] == [3.0, 3.0, 3.0]
    assert plans["himae"]["checkpoint_sha256"] == sha256(ckpt)
    # stock CT normalization with these plans maps the window [-175, 250] onto [0, 1]
    norm = CTNormalization(use_mask_for_norm=False,
                           intensityproperties=plans["foreground_intensity_properties_per_channel"]["0"])
    hu = np.array([-1000, -175, 37.5, 250, 3000], np.float32)
    assert np.allclose(norm.run(hu.copy()), [0, 0, 0.5, 1, 1])
    # the architecture block builds the UNETR nnU-Net's way, with the checkpoint's encoder
    arch = cfg["architecture"]
    net = pydoc.locate(arch["network_class_name"])(input_channels=1, num_classes=7, deep_supervision=False,
                                                   **arch["arch_kwargs"])
    assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 7, 32, 32, 32)
    assert net.config["embed_dim"] == meta["model"]["embed_dim"] and net.config["depth"] == meta["model"]["depth"]

    assert main(args) == 0  # same settings again: a no-op
    assert main(args + ["--batch-size", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--batch-size", "4", "--overwrite", "--epochs", "7", "--lr", "3e-4"]) == 0
    plans = json.loads((folder / "HiEndMAEPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 4
    assert plans["himae"]["finetune"]["num_epochs"] == 7 and plans["himae"]["finetune"]["initial_lr"] == 3e-4
    assert digest(folder / "nnUNetPlans.json") == base_digest  # the dataset's own plans never change

    for bad, message in ((["--plans-name", "nnUNetPlans"], "nnU-Net's own plans"),
                         (["--plans-name", "Hi__End"], "contains '__', which nnU-Net uses to split"),
                         (["--patch-size", "40", "32", "32"], "not a multiple"),
                         (["--checkpoint", str(tmp_path / "gone.pt")], "does not exist")):
        assert main(args + bad) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert digest(folder / "nnUNetPlans.json") == base_digest
    other = deepcopy(plans)
    other.pop("himae")
    (folder / "Foreign.json").write_text(json.dumps(other | {"plans_name": "Foreign"}))
    assert main(args + ["--plans-name", "Foreign"]) == 2
    assert "not written by himae-nnunet" in capsys.readouterr().err


def test_mae_and_hiend_plans_share_one_data_folder(nnunet_dirs, tmp_path, capsys):
    """Same spacing, window and resampling: the second plans reuse the first one's preprocessed data."""
    folder = nnunet_dirs["nnUNet_preprocessed"] / "Dataset900_X"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(base_plans()))
    hiend, _ = tiny_checkpoint(tmp_path / "hiend.pt")
    mae, _ = tiny_checkpoint(tmp_path / "mae.pt", stages=0)
    args = ["--patch-size", "32", "32", "32", "-np", "1"]
    assert main(["plan", "900", "--checkpoint", str(hiend), *args]) == 0
    data = folder / json.loads((folder / "HiEndMAEPlans.json").read_text())["configurations"]["3d_fullres"][
        "data_identifier"]
    data.mkdir()
    (data / "case.pkl").write_bytes(b"")  # as if preprocessed
    capsys.readouterr()
    assert main(["plan", "900", "--checkpoint", str(mae), "--plans-name", "MAEPlans", "--preprocess", *args]) == 0
    out = capsys.readouterr().out
    assert "sharing its data folder HiEndMAEPlans_3d_fullres" in out and "not preprocessing it again" in out
    mae_plans = json.loads((folder / "MAEPlans.json").read_text())
    assert mae_plans["configurations"]["3d_fullres"]["data_identifier"] == "HiEndMAEPlans_3d_fullres_zlin"
    assert mae_plans["himae"]["pretrain"]["method"] == "mae" and not (folder / "MAEPlans_3d_fullres_zlin").exists()
    assert main(["plan", "900", "--checkpoint", str(mae), "--plans-name", "MAE2mm", "--spacing", "2", "2", "2",
                 *args]) == 0  # other spacing: a data folder of its own
    other = json.loads((folder / "MAE2mm.json").read_text())
    assert other["configurations"]["3d_fullres"]["data_identifier"] == "MAE2mm_3d_fullres_zlin"
