"""The authors' downstream UNETR (../shared/fixtures/official_unetr_tiny): their state dict converted by our code
reproduces their logits; their pretraining checkpoint through `import-official` and the trainers' weight loading
gives the encoder their own loader built; `plan --unetr authors` plans build and run."""
import json

import pytest
import torch

from himae_nnunet.checkpoint.format import sha256
from himae_nnunet.cli import main
from himae_nnunet.core.errors import UserError
from himae_nnunet.models import UNETR
from himae_nnunet.models.unetr_authors import authors_key_to_ours, convert_authors_unetr_state_dict
from himae_nnunet.vit_plans.planning import derive_vit_plans
from himae_nnunet.vit_plans.weights import (build_network_from_plans, load_pretrained_into, network_channels,
                                           read_pretrained)
from test_plan import base_plans, tiny_checkpoint

TOL = 1e-5
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz",
                "numTraining": 2}


@pytest.fixture(scope="module")
def official():
    from conftest import FIXTURES, need_shared
    folder = need_shared(FIXTURES / "official_unetr_tiny")
    config = json.loads((folder / "config.json").read_text())
    state_dict = torch.load(folder / "unetr_state_dict.pth", weights_only=True)
    return folder, config, state_dict


def authors_unetr(config: dict, norm_eps: float = 1e-5) -> UNETR:
    """Our UNETR with the fixture's configuration (their names: hidden_size, feature_size, ...)."""
    u = config["unetr"]
    return UNETR(input_channels=config["in_chans"], num_classes=u["out_channels"], preset=None,
                 patch_size=config["patch_size"], embed_dim=u["hidden_size"], depth=config["depth"],
                 num_heads=u["num_heads"], mlp_ratio=u["mlp_dim"] / u["hidden_size"], decoder_dim=config["dec_dim"],
                 decoder_heads=config["dec_heads"], patch_size_voxels=(config["img_size"],) * 3,
                 feature_size=u["feature_size"], keep_cls_token=False, pos_embed="learnable", decoder="authors",
                 norm_eps=norm_eps)


def test_their_state_dict_reproduces_their_logits(official):
    folder, config, state_dict = official
    io = torch.load(folder / "unetr_io.pt", weights_only=True)
    net = authors_unetr(config).eval()
    net.load_state_dict(convert_authors_unetr_state_dict(state_dict), strict=True)  # every key, both ways
    with torch.no_grad():
        logits = net(io["input"])
    assert logits.shape == io["logits"].shape
    assert (logits - io["logits"]).abs().max() < TOL


def test_conversion_refuses_foreign_keys(official):
    _, _, state_dict = official
    with pytest.raises(UserError, match="encoder.cls_token is not a key of the authors' UNETR"):
        convert_authors_unetr_state_dict({**state_dict, "encoder.cls_token": torch.zeros(1, 1, 96)})


def test_their_pretraining_checkpoint_gives_their_encoder(official, tmp_path, capsys):
    """import-official, then the plans' network (the trainers' static builder) and the trainers' loader."""
    folder, config, state_dict = official
    ours = tmp_path / "imported.pt"
    assert main(["import-official", str(folder / "pretrain_checkpoint.pth"), str(ours),
                 "--config", str(folder / "config.json")]) == 0
    # the fixture's tables were perturbed; their decoder's is not needed downstream and is reported, not refused
    assert "WARNING module.decoder_pos_embed: dropped although it differs" in capsys.readouterr().out
    _, meta = read_pretrained(ours)
    plans = derive_vit_plans(base_plans(), str(ours), meta, sha256(ours), "P", patch_size=(96, 96, 96),
                             feature_size=config["unetr"]["feature_size"], unetr="authors", warn=lambda _: None)
    net = build_network_from_plans(plans["configurations"]["3d_fullres"],
                                   *network_channels(plans, DATASET_JSON, "3d_fullres"))
    report = load_pretrained_into(net, ours, log=lambda _: None)

    theirs = convert_authors_unetr_state_dict(state_dict)
    expected = {authors_key_to_ours(k) for k in config["loaded_from_pretraining"]}
    assert len(expected) == 149 and set(report["loaded"]) == expected
    got = net.state_dict()
    assert all(torch.equal(got[k], theirs[k]) for k in expected)
    assert {k for k in got if k.startswith("encoder.")} == expected  # no cls token, nothing else random
    assert "encoder.cls_token (the network has none: cls token dropped)" in report["skipped"]
    assert net.encoder.pos_embed.requires_grad and net.encoder.norm.eps == 1e-5


def test_plan_unetr_authors_builds_and_runs(tmp_path, nnunet_dirs, capsys):
    folder = nnunet_dirs["nnUNet_preprocessed"] / "Dataset900_X"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(base_plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    ckpt, _ = tiny_checkpoint(tmp_path / "p12.pt", crop=48, patch_size=12)
    args = ["plan", "900", "--checkpoint", str(ckpt), "--patch-size", "48", "36", "60", "--feature-size", "4"]
    assert main(args + ["--unetr", "authors"]) == 0
    assert "network UNETR (authors decoder)" in capsys.readouterr().out
    assert main(args + ["--plans-name", "Default"]) == 0  # the default is the authors' UNETR
    assert main(args + ["--plans-name", "Ours", "--unetr", "ours"]) == 0
    kwargs = {name: json.loads((folder / f"{name}.json").read_text())["configurations"]["3d_fullres"]["architecture"]
              ["arch_kwargs"] for name in ("HiEndMAEPlans", "Default", "Ours")}
    assert kwargs["HiEndMAEPlans"] == kwargs["Default"]
    picked = {name: (k["decoder"], k["keep_cls_token"], k["norm_eps"]) for name, k in kwargs.items()}
    assert picked == {"HiEndMAEPlans": ("authors", False, 1e-5), "Default": ("authors", False, 1e-5),
                      "Ours": ("ours", True, 1e-6)}

    plans = json.loads((folder / "HiEndMAEPlans.json").read_text())
    torch.manual_seed(0)
    net = build_network_from_plans(plans["configurations"]["3d_fullres"],
                                   *network_channels(plans, DATASET_JSON, "3d_fullres"))
    load_pretrained_into(net, ckpt, log=lambda _: None)
    y = net(torch.rand(2, 1, 48, 36, 60))  # token grid 4 x 3 x 5 -> 32 x 24 x 40 -> resized to the input
    assert y.shape == (2, 3, 48, 36, 60)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())  # no unused parameter (DDP)


def test_decoder_compute_behind_the_default():
    """The README's reason for the default, recounted (meta device: shapes only)."""
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "benchmarks"))
    from unetr_decoders import count
    p12 = {d: count("vit_b12_1536", (96, 96, 96), 32, d) for d in ("ours", "authors")}
    assert p12["ours"]["decoder_gmacs"] > 2 * p12["authors"]["decoder_gmacs"]
    assert p12["ours"]["gmacs"] - p12["ours"]["decoder_gmacs"] == pytest.approx(
        p12["authors"]["gmacs"] - p12["authors"]["decoder_gmacs"], rel=0.01)  # same encoder (ours: + cls token)
    p16 = {d: count("vit_b16_1536", (96, 96, 96), 32, d) for d in ("ours", "authors")}
    assert p16["ours"]["decoder_gmacs"] < p16["authors"]["decoder_gmacs"]
