"""Trainers and weights without a training run: lookup through nnUNet_extTrainer, pretrained loading (resize,
channel adaptation, report), the checks that refuse bad input, optimizer groups and schedule, export."""
import json

import pytest
import torch

from himae_nnunet.checkpoint.format import CheckpointError, sha256
from himae_nnunet.cli import main
from himae_nnunet.vit_plans.cli import ext_trainer_hint, ext_trainer_path
from himae_nnunet.core.errors import UserError
from himae_nnunet.models import UNETR
from himae_nnunet.models.vit import resize_pos_embed, sincos_pos_embed_3d
from himae_nnunet.vit_plans.planning import derive_vit_plans
from himae_nnunet.trainers.finetune import (WarmupDecayLR, nnUNetTrainerHiEndMAE, nnUNetTrainerUNETR,
                                            param_groups)
from himae_nnunet.vit_plans.weights import build_network_from_plans, load_pretrained_into, read_pretrained
from test_plan import base_plans, tiny_checkpoint

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz",
                "numTraining": 2}


def test_trainers_found_through_ext_trainer_path(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from himae_nnunet.trainers import variants
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert f"export nnUNet_extTrainer={ext_trainer_path()}" in ext_trainer_hint()
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
        recursive_find_trainer_class_by_name("nnUNetTrainerHiEndMAE_smoke")
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_path())
    assert ext_trainer_hint() is None
    cls = recursive_find_trainer_class_by_name("nnUNetTrainerHiEndMAE_smoke")
    assert cls is variants.nnUNetTrainerHiEndMAE_smoke and (cls.EPOCHS, cls.ITERATIONS) == (2, 10)
    assert recursive_find_trainer_class_by_name("nnUNetTrainerUNETR_5000epochs").EPOCHS == 5000


def test_resize_adapt_and_report(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path / "tiny.pt", crop=48, pos_embed="learnable")  # token grid 3x3x3
    sd, meta = read_pretrained(ckpt)
    net = UNETR(2, 3, preset="vit_tiny", patch_size_voxels=(32, 48, 64), feature_size=4, pos_embed="learnable")
    lines = []
    report = load_pretrained_into(net, ckpt, lines.append)
    own = net.state_dict()
    assert torch.equal(own["encoder.blocks.11.mlp.fc2.weight"], sd["encoder.blocks.11.mlp.fc2.weight"])
    assert torch.equal(own["encoder.cls_token"], sd["encoder.cls_token"])
    assert torch.allclose(own["encoder.pos_embed"], resize_pos_embed(sd["encoder.pos_embed"], (3, 3, 3), (2, 3, 4)))
    x = torch.rand(1, 1, 16, 16, 16)  # one patch; the same scan in both channels gives the pretrained response
    w, b = sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"]
    ref = torch.nn.functional.conv3d(x, w, b, stride=16)
    assert torch.allclose(net.encoder.patch_embed.proj(x.repeat(1, 2, 1, 1, 1)), ref, atol=1e-5)
    assert "mask_token" in report["skipped"] and any(k.startswith("decoder.") for k in report["skipped"])
    assert report["random"] and all(k.startswith("decoder.") for k in report["random"])
    assert len(report["loaded"]) == len([k for k in sd if k.startswith("encoder.")]) - 2  # pos resized, conv adapted
    text = "\n".join(lines)
    assert "grid (3, 3, 3) -> (2, 3, 4)" in text and "input channels 1 -> 2" in text and "random init" in text

    sincos, _ = tiny_checkpoint(tmp_path / "sincos.pt", crop=48)
    for pos in ("learnable", "sincos"):  # a sin-cos pretrained table is rebuilt exactly for the new grid
        net = UNETR(1, 3, preset="vit_tiny", patch_size_voxels=(32, 32, 64), feature_size=4, keep_cls_token=False,
                    pos_embed=pos)
        report = load_pretrained_into(net, sincos, log=lambda s: None)
        assert torch.allclose(net.encoder.pos_embed[0], sincos_pos_embed_3d(96, (2, 2, 4)))
        assert any("cls token dropped" in k for k in report["skipped"])


def test_authors_checkpoint_loads_directly(fixtures_dir):
    path = fixtures_dir / "official_tiny" / "reference_checkpoint.pth"
    raw = torch.load(path, weights_only=True)["state_dict"]
    net = UNETR(1, 2, preset=None, patch_size_voxels=(48, 48, 48), feature_size=4, patch_size=12, embed_dim=96,
                depth=12, num_heads=4, decoder_dim=48, decoder_heads=4)
    report = load_pretrained_into(net, path, log=lambda s: None)
    assert torch.equal(net.state_dict()["encoder.blocks.5.attn.qkv.weight"], raw["module.encoder.blocks.5.attn.qkv.weight"])
    assert not report["resized"] and not [k for k in report["random"] if k.startswith("encoder.")]


def test_checkpoint_of_another_preset_is_refused(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path / "small.pt", preset="vit_small")
    net = UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4)
    with pytest.raises(CheckpointError, match=r"vit_small .*dim 384.* but the plans build vit_tiny .*dim 96"):
        load_pretrained_into(net, ckpt)


def vit_plans(ckpt, meta, **options):
    return derive_vit_plans(base_plans(), str(ckpt), meta, sha256(ckpt), "P", patch_size=(32, 32, 32),
                            feature_size=4, **options)


def test_trainer_refuses_bad_input(tmp_path, nnunet_dirs, capsys):
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    plans = vit_plans(ckpt, meta)
    nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")  # fine as planned
    plans["configurations"]["3d_fullres"]["spacing"] = [1.0, 1.0, 1.0]
    nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")
    assert "spacing [1.0, 1.0, 1.0] differs from the pretraining spacing [3.0, 3.0, 3.0]" in capsys.readouterr().out
    plans["himae"]["strict"] = True
    with pytest.raises(UserError, match="refused"):
        nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")
    plans = vit_plans(ckpt, meta, window=(-100, 200), strict=False)
    nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")
    assert "intensity window [-100.0, 200.0] differs" in capsys.readouterr().out

    small, small_meta = tiny_checkpoint(tmp_path / "small.pt", preset="vit_small")
    plans = vit_plans(small, small_meta)
    plans["himae"].update(checkpoint=str(ckpt), checkpoint_sha256=sha256(ckpt))  # plans edited by hand
    with pytest.raises(CheckpointError, match="vit_tiny .* but the plans build vit_small"):
        nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")
    plans = vit_plans(ckpt, meta)
    tiny_checkpoint(ckpt, crop=32)  # the file changes after planning
    with pytest.raises(CheckpointError, match="changed since the plans were made"):
        nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")
    ckpt.unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")
    base = base_plans() | {"configurations": {"3d_fullres": base_plans()["configurations"]["3d_fullres"]}}
    with pytest.raises(UserError, match="needs ViT plans written by `himae-nnunet plan`.*PlainConvUNet"):
        nnUNetTrainerHiEndMAE(base, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    assert not any(nnunet_dirs["nnUNet_results"].iterdir())  # refused before nnU-Net made a folder


def test_options_from_plans_and_variants(tmp_path, nnunet_dirs):
    from himae_nnunet.trainers.variants import nnUNetTrainerUNETR_smoke
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    plans = vit_plans(ckpt, meta, finetune=dict(num_epochs=7, iterations_per_epoch=3, initial_lr=3e-4))
    t = nnUNetTrainerUNETR(plans | {"continue_training": False}, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    assert (t.num_epochs, t.num_iterations_per_epoch, t.initial_lr, t.enable_deep_supervision) == (7, 3, 3e-4, False)
    t = nnUNetTrainerUNETR_smoke(plans | {"continue_training": False}, "3d_fullres", 0, DATASET_JSON,
                                 torch.device("cpu"))
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (2, 10, 2)  # variant wins
    assert set(t.my_init_kwargs) == {"plans", "configuration", "fold", "dataset_json", "device"}
    t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert t.inference_allowed_mirroring_axes is None  # smoke: one-pass validation
    with pytest.raises(UserError, match="unknown fine-tuning options"):
        vit_plans(ckpt, meta, finetune=dict(epochs=3))


def test_static_builder_rebuilds_the_same_network(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    pm = PlansManager(vit_plans(ckpt, meta))
    cm = pm.get_configuration("3d_fullres")
    a = nnUNetTrainerUNETR.build_network_architecture(pm, cm, 1, 3, True)
    b = nnUNetTrainerHiEndMAE.build_network_architecture(pm, cm, 1, 3, False)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)  # a tensor, no deep-supervision list
    pm_base = PlansManager(base_plans())
    with pytest.raises(UserError, match="not our UNETR"):
        nnUNetTrainerUNETR.build_network_architecture(pm_base, pm_base.get_configuration("3d_fullres"), 1, 3)


def test_param_groups_and_schedule():
    net = UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4, pos_embed="learnable")
    groups = param_groups(net, 1e-5, layer_decay=0.5)
    named = {id(p): n for n, p in net.named_parameters()}
    no_decay = {named[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"encoder.cls_token", "encoder.pos_embed", "encoder.norm.weight", "decoder.seg_layers.bias"} <= no_decay
    assert "encoder.blocks.0.attn.qkv.weight" not in no_decay
    scale = {named[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["encoder.patch_embed.proj.weight"] == 0.5 ** 13 and scale["encoder.blocks.11.attn.qkv.weight"] == 0.5
    assert scale["decoder.seg_layers.weight"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))

    opt = torch.optim.AdamW(param_groups(net, 1e-5, 1.0), lr=1e-4)
    sched = WarmupDecayLR(opt, 1e-4, num_epochs=100, warmup_epochs=10, freeze_encoder_epochs=5)
    lrs = {}
    for epoch in (0, 4, 5, 9, 55, 99):
        sched.step(epoch)
        lrs[epoch] = {g["is_encoder"]: g["lr"] for g in opt.param_groups}
    assert lrs[0] == {True: 0.0, False: pytest.approx(1e-5)} and lrs[4][True] == 0.0  # warmup, encoder frozen
    assert lrs[5][True] == pytest.approx(6e-5) and lrs[9][False] == pytest.approx(1e-4)
    assert lrs[55][False] == pytest.approx(0.5e-4) and lrs[99][False] < 1e-7  # cosine to zero


def test_export_pretrained_for_stock_loader(tmp_path, nnunet_dirs, capsys):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    plans = vit_plans(ckpt, meta)
    folder = nnunet_dirs["nnUNet_preprocessed"] / "Dataset900_X"
    folder.mkdir()
    (folder / "P.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    out = tmp_path / "full.pth"
    assert main(["export-pretrained", "--plans", str(folder / "P.json"), "-o", str(out)]) == 0
    assert "-tr nnUNetTrainerUNETRPretrainedWeights -p P -pretrained_weights" in capsys.readouterr().out
    torch.manual_seed(1)
    net = build_network_from_plans(plans["configurations"]["3d_fullres"], 1, 3)
    load_pretrained_weights(net, str(out))  # nnU-Net's own loader: every key but seg_layers, same shapes
    sd, _ = read_pretrained(ckpt)
    assert torch.equal(net.state_dict()["encoder.blocks.3.norm1.weight"], sd["encoder.blocks.3.norm1.weight"])
    assert main(["export-pretrained", "--plans", str(folder / "P.json"), "-o", str(out)]) == 2  # no overwrite
    small, _ = tiny_checkpoint(tmp_path / "small.pt", preset="vit_small")
    assert main(["export-pretrained", "--plans", str(folder / "P.json"), "--checkpoint", str(small), "-o",
                 str(tmp_path / "x.pth")]) == 2
    assert "vit_small" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()
    # the trainer's checks, made by the one shared function: strict spacing, then a changed file
    strict = plans | {"himae": plans["himae"] | {"strict": True}}
    strict["configurations"]["3d_fullres"] = plans["configurations"]["3d_fullres"] | {"spacing": [1.0, 1.0, 1.0]}
    (folder / "S.json").write_text(json.dumps(strict | {"plans_name": "S"}))
    assert main(["export-pretrained", "--plans", str(folder / "S.json"), "-o", str(tmp_path / "s.pth")]) == 2
    assert "spacing [1.0, 1.0, 1.0] differs from the pretraining spacing" in capsys.readouterr().err
    tiny_checkpoint(ckpt, crop=32)  # the plans' file is replaced after planning
    assert main(["export-pretrained", "--plans", str(folder / "P.json"), "-o", str(tmp_path / "y.pth")]) == 2
    assert "changed since the plans were made" in capsys.readouterr().err
    assert not (tmp_path / "s.pth").exists() and not (tmp_path / "y.pth").exists()


def test_train_wrapper_refuses_non_vit_or_missing_plans(nnunet_dirs, capsys):
    folder = nnunet_dirs["nnUNet_preprocessed"] / "Dataset900_X"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(base_plans()))
    assert main(["train", "900", "3d_fullres", "0", "-p", "nnUNetPlans", "-device", "cpu"]) == 2
    assert "are not ViT plans; run `himae-nnunet plan`" in capsys.readouterr().err
    assert main(["train", "900", "3d_fullres", "0", "-device", "cpu"]) == 2  # default -p HiEndMAEPlans
    assert "HiEndMAEPlans.json do not exist" in capsys.readouterr().err
    assert not any(nnunet_dirs["nnUNet_results"].iterdir())


def write_plans_folder(root, plans) -> None:
    folder = root / "Dataset900_X"
    folder.mkdir(exist_ok=True)
    (folder / f"{plans['plans_name']}.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))


@pytest.mark.parametrize("trainer,edit,message", [
    ("nnUNetTrainerHiEndMAE", lambda h: h["finetune"].update(epochs=3),
     r"plans 'P' himae.finetune: unknown fine-tuning options \['epochs'\]"),
    ("nnUNetTrainerUNETR", lambda h: h.update(format_version=2, package_version="9.0"),
     r"himae.format_version 2 \(written by himae-nnunet 9.0\).*upgrade"),
    ("nnUNetTrainer", lambda h: None, r"UNETR\(deep_supervision=True\).*-tr nnUNetTrainerHiEndMAE"),
    ("nnUNetTrainerUNETRPretrainedWeights", lambda h: None, "starts from a full-network file: give "
                                                            "-pretrained_weights FILE"),
])
def test_stock_run_training_refuses_bad_plans_and_stock_trainers(tmp_path, nnunet_dirs, monkeypatch, trainer,
                                                                 edit, message):
    """nnU-Net's own run_training (what nnUNetv2_train calls): hand-edited or newer plans, a CNN trainer on our
    plans (stock: KeyError 'strides') and the full-network-file trainer without its file stop with our
    message, before any data is read."""
    from nnunetv2.run.run_training import run_training
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_path())
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    plans = vit_plans(ckpt, meta)
    edit(plans["himae"])
    plans["configurations"]["3d_fullres"]["batch_dice"] = False  # as nnU-Net writes it (base_plans() has none)
    write_plans_folder(nnunet_dirs["nnUNet_preprocessed"], plans)
    data = nnunet_dirs["nnUNet_preprocessed"] / "Dataset900_X" / "P_3d_fullres_zlin"
    data.mkdir()
    (data / "case.b2nd").write_bytes(b"")  # never read: the refusals come first
    with pytest.raises(UserError, match=message):
        run_training("900", "3d_fullres", 0, trainer, "P", device=torch.device("cpu"))


def test_plans_carry_the_package_version(tmp_path):
    import himae_nnunet
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    h = vit_plans(ckpt, meta)["himae"]
    assert (h["format_version"], h["package_version"]) == (1, himae_nnunet.__version__)


def test_logged_lr_is_the_heads_and_frozen_encoder_is_not_clipped():
    from himae_nnunet.trainers.finetune import applied_parameters, head_first
    torch.manual_seed(0)
    net = UNETR(1, 2, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4)
    opt = torch.optim.AdamW(head_first(param_groups(net, 1e-5, layer_decay=0.5)), lr=1e-4)
    sched = WarmupDecayLR(opt, 1e-4, num_epochs=10, warmup_epochs=0, freeze_encoder_epochs=1)
    sched.step(0)
    assert not opt.param_groups[0]["is_encoder"] and opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    net(torch.rand(1, 1, 32, 32, 32)).square().mean().backward()
    decoder = [p for n, p in net.named_parameters() if not n.startswith("encoder.")]
    applied = applied_parameters(opt)
    assert {id(p) for p in applied} == {id(p) for p in decoder}  # epoch 0: the encoder is frozen
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in decoder]))
    assert torch.nn.utils.clip_grad_norm_(applied, 1e9) == pytest.approx(expected.item(), rel=1e-5)
    sched.step(1)
    assert len(applied_parameters(opt)) == len(list(net.parameters()))


def test_ddp_batch_must_split_evenly_over_the_gpus(tmp_path, nnunet_dirs):
    """nnU-Net's DDP batch split under a 3-process group (torch's fake backend: one process, no GPU)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    ckpt, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
    try:
        with pytest.raises(UserError, match=r"-num_gpus 3: plans 'P' have batch size 2.*--batch-size 3 --overwrite"):
            nnUNetTrainerUNETR(vit_plans(ckpt, meta) | {"continue_training": False}, "3d_fullres", 0, DATASET_JSON,
                               torch.device("cpu"))
        assert not any(nnunet_dirs["nnUNet_results"].iterdir())
        t = nnUNetTrainerUNETR(vit_plans(ckpt, meta, batch_size=6) | {"continue_training": False}, "3d_fullres",
                               0, DATASET_JSON, torch.device("cpu"))
        t._set_batch_size_and_oversample()
        assert t.batch_size == 2  # 6 patches over 3 GPUs
    finally:
        dist.destroy_process_group()


def test_third_party_imports_are_declared():
    """Every package the code imports is a requirement in setup.py; timm's range holds the version we test."""
    import ast
    import re
    import sys
    import timm
    from conftest import REPO
    setup = (REPO / "setup.py").read_text()
    block = re.search(r"install_requires=\[(.*?)\]", setup, re.S).group(1)
    requirements = dict(re.match(r"([\w.\-]+)(.*)", r).groups() for r in re.findall(r'"([^"]+)"', block))
    declared = {name.lower().replace("-", "_") for name in requirements}
    imported = set()
    for folder in ("himae_nnunet", "pretrain", "trainers"):
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported.add(node.module.split(".")[0])
    third = {m.lower() for m in imported if m not in sys.stdlib_module_names and m != "himae_nnunet"}
    assert "timm" in third and third <= declared, third - declared
    low, high = re.fullmatch(r">=([\d.]+),<([\d.]+)", requirements["timm"]).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3])  # noqa: E731
    assert as_tuple(low) <= as_tuple(timm.__version__) < as_tuple(high)


def test_cpu_trainers_follow_omp_num_threads(monkeypatch):
    """nnUNetv2_train -device cpu sets torch to every core; our trainers bring it back to OMP_NUM_THREADS, so
    comparison cells side by side do not oversubscribe the CPU. Without the variable nothing changes."""
    from himae_nnunet.core.nnunet_env import cpu_threads_from_env
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cpu_threads_from_env(torch.device("cpu"))
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        cpu_threads_from_env(torch.device("cuda"))
        assert torch.get_num_threads() == 2
        cpu_threads_from_env(torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
