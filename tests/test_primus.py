"""Hi-End-MAE for nnU-Net's Primus: the encoder built from dynamic-network-architectures' own modules, and the
whole route on real CT with stock nnU-Net: prepare-pretrain -> pretrain --model primus_s (stopped, resumed) ->
plan (Primus plans) -> export-pretrained -> nnUNetv2_train with nnU-Net's Primus-S trainer (short-budget subclass)
-> nnUNetv2_predict on patient B. Small: 3 mm, 32^3 crops and patches, 4 pretraining steps, 1 x 2 iterations."""
import json

import pytest
import torch
from dynamic_network_architectures.architectures.primus import Primus

from himae_nnunet.checkpoint.format import load_checkpoint, make_meta, read_checkpoint, save_checkpoint
from himae_nnunet.core.errors import UserError
from himae_nnunet.models.flops import count
from himae_nnunet.models.hiend_mae import HiEndMAE
from himae_nnunet.models.presets import ConfigError, model_config
from himae_nnunet.models.unetr import UNETR
from himae_nnunet.scans.oneshot_dataset import CASE_B, write_ab_dataset
from conftest import DATA, need_shared
from nnunet_chain import run, tree_env

PLANS, TRAINER = "HiEndMAEPrimusPlans", "nnUNet_Primus_S_Trainer_HimaeBudget"


def primus_like(model: HiEndMAE, classes: int = 3) -> Primus:
    """DNA's own Primus with our encoder's weights (the network stock trainers build, same sizes)."""
    c = model.config
    net = Primus(1, c["embed_dim"], (8, 8, 8), classes, c["depth"], c["num_heads"], c["crop_size"],
                 init_values=0.1, scale_attn_inner=True)
    ours = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert set(net.state_dict()) - set(ours) == {"mask_token"} | {k for k in net.state_dict() if "up_projection" in k}
    net.load_state_dict({**net.state_dict(), **ours})
    return net.eval()


@pytest.mark.parametrize("method_stages", [3, 0])
def test_encoder_is_dnas_primus_and_keeps_rope_aligned_with_visible_tokens(method_stages):
    torch.manual_seed(0)
    model = HiEndMAE(model_config("primus_tiny", crop_size=32, stages=method_stages)).eval()
    net, x = primus_like(model), torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        theirs, _ = net.eva(net.down_projection(x).flatten(2).transpose(1, 2))
        ours, hidden = model.encoder(x)
        assert torch.equal(ours, theirs) and len(hidden) == 8
        # a permutation of all tokens: each token's output is its unpermuted one only if its rotary code followed it
        perm = torch.rand(2, 64).argsort(1)
        shuffled, _ = model.encoder(x, perm)
        assert torch.allclose(shuffled, torch.gather(theirs, 1, perm[..., None].expand(-1, -1, 96)), atol=1e-5)
        wrong, _ = model.encoder(x[:, :, :, :, torch.arange(31, -1, -1)], perm)  # other content, same positions
        assert not torch.allclose(wrong, shuffled, atol=1e-3)
        out = model(x)
    # no cls token: the decoder sees the 16 visible + 48 masked tokens only, and the loss is on the masked ones
    assert model.prefix == 0 and out.decoder_out.shape == (2, 64, 512) and out.hidden_states[0].shape == (2, 16, 96)
    rec, visible = model.reconstruct(x, out)
    assert rec.shape == x.shape and visible.mean() == 0.25
    model.train()
    model(x).loss.backward()
    assert model.encoder.eva.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_primus_sizes_match_the_stock_trainers_and_bad_configs_say_why():
    for name, (dim, depth, heads) in dict(primus_s=(396, 12, 6), primus_b=(792, 12, 12), primus_m=(864, 16, 12),
                                          primus_l=(1056, 24, 16)).items():
        c = model_config(name)
        assert (c["encoder"], c["embed_dim"], c["depth"], c["num_heads"], c["patch_size"]) == ("primus", dim, depth,
                                                                                              heads, 8)
        assert c["taps"] == (depth // 4, depth // 2, 3 * depth // 4)
    with pytest.raises(ConfigError, match="learned absolute position"):
        model_config("primus_tiny", pos_embed="sincos")
    with pytest.raises(ConfigError, match="rotary"):
        model_config("primus_tiny", embed_dim=100, num_heads=4)
    with pytest.raises(ConfigError, match="Primus trainers"):
        UNETR(1, 3, preset="primus_tiny", patch_size_voxels=(32, 32, 32))


def test_checkpoint_records_the_encoder_and_flops_count_it(tmp_path):
    torch.manual_seed(0)
    model = HiEndMAE(model_config("primus_tiny", crop_size=32))
    save_checkpoint(tmp_path / "p.pt", model.state_dict(), make_meta(model.config))
    assert read_checkpoint(tmp_path / "p.pt")["meta"]["encoder"] == "primus"
    back = load_checkpoint(tmp_path / "p.pt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    row = count("primus_tiny", stages=3, crop=32)
    assert row["tokens"] == 64 and row["visible_tokens"] == 16 and row["encoder_gmacs"] > 0


def test_encoder_option_must_agree_with_the_preset():
    from himae_nnunet.pretrain.options import PretrainOptions, build_config
    assert build_config(PretrainOptions(["x"], "o", model="primus_tiny", encoder="primus"))["encoder"] == "primus"
    with pytest.raises(UserError, match="--encoder primus does not match --model vit_tiny"):
        build_config(PretrainOptions(["x"], "o", model="vit_tiny", encoder="primus"))


@pytest.fixture(scope="module")
def primus_chain(tmp_path_factory):
    data = need_shared(DATA)
    root = tmp_path_factory.mktemp("primus")
    env = tree_env(root)
    raw = write_ab_dataset(data, root / "nnUNet_raw")
    run("himae-nnunet", "prepare-pretrain", "-d", 501, "--spacing", 3, 3, 3, "--crop-size", 32, "-np", 1, env=env)
    args = ["himae-nnunet", "pretrain", "-d", 501, "--model", "primus_s", "--encoder", "primus", "--crop-size", 32,
            "--steps", 4, "--batch-volumes", 1, "--crops-per-volume", 2, "--workers", 0, "--device", "cpu",
            "--lr", 1e-4, "--warmup", 1, "--no-tensorboard", "--preview-every", 0]
    run(*args, "-o", root / "resumed", "--stop-at", 2, env=env)
    run(*args, "-o", root / "resumed", "--resume", env=env)
    run(*args, "-o", root / "straight", env=env)
    run("nnUNetv2_plan_and_preprocess", "-d", 501, "-c", "3d_fullres", "-np", 1, env=env)
    ckpt = root / "resumed" / "checkpoint_final.pt"
    plan_out = run("himae-nnunet", "plan", 501, "--checkpoint", ckpt, "--patch-size", 32, 32, 32, "--epochs", 1,
                   "--iterations-per-epoch", 2, "--val-iterations-per-epoch", 1, "--no-tta-mirroring",
                   "--preprocess", "-np", 1, env=env)
    run("himae-nnunet", "split", 501, "--cases", "patientA", env=env)
    pre = root / "nnUNet_preprocessed" / raw.name
    export_out = run("himae-nnunet", "export-pretrained", "--plans", pre / f"{PLANS}.json", "-o",
                     root / "primus.pth", env=env)
    ext = run("himae-nnunet", "ext-trainer-path", env=env).strip()
    return dict(root=root, env=env | {"nnUNet_extTrainer": ext, "nnUNet_n_proc_DA": "0"}, raw=raw, pre=pre,
                ckpt=ckpt, plan_out=plan_out, export_out=export_out)


def test_primus_pretraining_resumes_exactly(primus_chain):
    root = primus_chain["root"]
    resumed, straight = (read_checkpoint(root / run / "checkpoint_final.pt") for run in ("resumed", "straight"))
    assert resumed["meta"]["encoder"] == "primus" and resumed["meta"]["step"] == 4
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    assert all(torch.equal(v, straight["state_dict"][k]) for k, v in resumed["state_dict"].items())
    losses = [json.loads(line)["loss"] for line in (root / "resumed" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4


def test_primus_plans_and_export_for_the_stock_trainer(primus_chain, monkeypatch):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.run.run_training import get_trainer_from_args
    plans = json.loads((primus_chain["pre"] / f"{PLANS}.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert plans["himae"]["network"] == "primus" and cfg["patch_size"] == [32, 32, 32]
    assert cfg["spacing"] == [3.0, 3.0, 3.0] and cfg["data_identifier"] == f"{PLANS}_3d_fullres_zlin"
    assert "PlainConvUNet" in cfg["architecture"]["network_class_name"]  # nnU-Net's block, ignored by Primus
    assert "-tr nnUNet_Primus_S_Trainer -p HiEndMAEPrimusPlans -pretrained_weights" in primus_chain["plan_out"]
    assert "281 tensors from pretraining (down_projection.*, eva.*), 11 at the trainer's own init" in \
        primus_chain["export_out"]
    # epoch 0 of the stock trainer: nnU-Net's own loader (its strict key/shape check) puts exactly our encoder in
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, primus_chain["env"][var])
    trainer = get_trainer_from_args("501", "3d_fullres", 0, "nnUNet_Primus_S_Trainer", PLANS,
                                    device=torch.device("cpu"))
    trainer.initialize()
    load_pretrained_weights(trainer.network, str(primus_chain["root"] / "primus.pth"))
    net = trainer.network.state_dict()
    pretrained = read_checkpoint(primus_chain["ckpt"])["state_dict"]
    encoder = {k[len("encoder."):]: v for k, v in pretrained.items() if k.startswith("encoder.")}
    assert len(encoder) == 281 and all(torch.equal(net[k], v) for k, v in encoder.items())


def test_stock_primus_training_and_prediction_on_patient_b(primus_chain):
    import SimpleITK as sitk
    env, root = primus_chain["env"], primus_chain["root"]
    out = run("nnUNetv2_train", 501, "3d_fullres", 0, "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
              "-pretrained_weights", root / "primus.pth", env=env)
    assert "Loading pretrained weights from file" in out
    fold = root / "nnUNet_results" / primus_chain["raw"].name / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    run("nnUNetv2_predict", "-i", primus_chain["raw"] / "imagesTs", "-o", root / "pred", "-d", 501, "-c",
        "3d_fullres", "-f", 0, "-tr", TRAINER, "-p", PLANS, "-chk", "checkpoint_final.pth", "-device", "cpu",
        "-npp", 1, "-nps", 1, env=env)
    pred = sitk.ReadImage(str(root / "pred" / f"{CASE_B}.nii.gz"))
    image = sitk.ReadImage(str(primus_chain["raw"] / "imagesTs" / f"{CASE_B}_0000.nii.gz"))
    assert pred.GetSize() == image.GetSize() and pred.GetSpacing() == pytest.approx(image.GetSpacing())
