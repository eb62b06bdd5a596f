"""The pretraining loop on the prepared real CTs (vit_tiny, small crops, CPU): both methods, checkpoints,
overfitting a fixed batch, kill + exact resume, two-process gloo DDP, non-finite loss, bad cases."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from himae_nnunet.checkpoint.format import load_checkpoint, read_checkpoint
from himae_nnunet.cli import main
from himae_nnunet.core.errors import UserError
from himae_nnunet.pretrain.loop import NonFiniteLoss, PretrainOptions, run_pretraining
from test_pretrain_prepare import tree  # noqa: F401  (session-prepared nnU-Net tree)

TINY = dict(datasets=[501], model="vit_tiny", crop_size=32, batch_volumes=1, crops_per_volume=2, workers=0,
            device="cpu", tensorboard=False, preview_every=0)
CLI_TINY = ["--dataset", "501", "--model", "vit_tiny", "--crop-size", "32", "--batch-volumes", "1",
            "--crops-per-volume", "2", "--device", "cpu", "--preview-every", "0", "--no-tensorboard"]


ENV1 = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}  # CLI subprocesses


def log_of(run: Path) -> list:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def strip(log: list) -> list:
    """What must match bit for bit between two runs (not the timings)."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in log]


@pytest.mark.parametrize("method", ["hiend", "mae"])
def test_both_methods_write_checkpoints_log_previews_tensorboard(method, tree, tmp_path):
    run = tmp_path / method
    o = PretrainOptions(output=str(run), method=method, steps=3, checkpoint_every=3,
                        **TINY | dict(datasets=[501, 502], preview_every=3, tensorboard=True))
    result = run_pretraining(o)
    assert result["step"] == 3 and all(map(lambda v: 0 < v < 2, result["losses"]))
    log = log_of(run)
    assert [r["step"] for r in log] == [1, 2, 3] and all({"loss", "lr", "crops_per_s"} <= set(r) for r in log)
    model = load_checkpoint(run / "checkpoint_final.pt")
    meta = model.meta
    assert (meta["method"], meta["stages"], meta["step"]) == (method, 3 if method == "hiend" else 0, 3)
    assert meta["spacing"] == [1.5, 1.5, 1.5] and meta["intensity_window"] == [-175.0, 250.0]
    assert any("Dataset502_Labelled" in d for d in meta["data"])
    assert len(model.decoder.cross_attention_blocks) == meta["stages"]
    state = torch.load(run / "checkpoint_latest.pt", weights_only=True)  # training state: plain data only
    assert state["training"]["next_step"] == 3 and state["training"]["optimizer"]["state"]
    assert read_checkpoint(run / "checkpoint_latest.pt")["meta"]["step"] == 3
    assert (run / "previews" / "step_0000003.png").stat().st_size > 5000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # no-decay groups: biases, norms, tokens, position embeddings
    groups = state["training"]["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    n_nodecay = sum(1 for n, p in model.named_parameters() if p.ndim < 2 or n.endswith(("cls_token", "mask_token")))
    assert len(groups[1]["params"]) == n_nodecay
    # the folder holds a run: refused without --resume; --resume with another seed is refused too
    with pytest.raises(UserError, match="already holds a pretraining run"):
        run_pretraining(replace(o, steps=4))
    with pytest.raises(UserError, match="seed"):
        run_pretraining(replace(o, steps=4, resume=True, seed=5))


def test_loss_overfits_a_fixed_batch_within_50_steps(tree, tmp_path):
    o = PretrainOptions(output=str(tmp_path / "overfit"), steps=50, warmup=5, lr=1e-3, min_lr=1e-3,
                        fixed_batch=True, checkpoint_every=100, **TINY)
    losses = run_pretraining(o)["losses"]
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses


def test_kill_and_resume_gives_the_uninterrupted_log(tree, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "himae_nnunet.cli", "pretrain", *CLI_TINY, "--steps", "400",
           "--checkpoint-every", "2", "--workers", "0", "--seed", "1"]
    proc = subprocess.Popen([*cmd, "--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=os.environ | ENV1)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / "log.jsonl").exists() and len((killed / "log.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = read_checkpoint(killed / "checkpoint_latest.pt")["meta"]["step"]
    assert saved >= 2 and not (killed / "checkpoint_final.pt").exists()
    stop = saved + 3
    # both continuations run as subprocesses like the killed run: bit-equality needs the same thread count
    for extra in (["--output", str(killed), "--resume"], ["--output", str(clean), "--workers", "1"]):
        res = subprocess.run([*cmd, *extra, "--stop-at", str(stop)], capture_output=True, text=True, timeout=240,
                             env=os.environ | ENV1)
        assert res.returncode == 0, res.stderr[-2000:]
    assert strip(log_of(killed)) == strip(log_of(clean)) and len(log_of(clean)) == stop
    a, b = (torch.load(r / "checkpoint_latest.pt", weights_only=True) for r in (killed, clean))
    assert a["meta"]["step"] == b["meta"]["step"] == stop
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert load_checkpoint(killed / "checkpoint_latest.pt").meta["step"] == stop


def _ddp_worker(rank: int, world: int, port: int, kwargs: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = run_pretraining(PretrainOptions(**kwargs))
    torch.save({"state": result["model"].state_dict(), "losses": result["losses"]}, f"{out}/rank{rank}.pt")


def test_two_process_gloo_ddp_matches_one_process_with_the_same_global_batch(tree, tmp_path):
    steps = dict(steps=3, warmup=1, lr=1e-4, checkpoint_every=3, seed=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = TINY | steps | dict(output=str(tmp_path / "ddp"))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, kwargs, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert r0["losses"] == r1["losses"]
    single = run_pretraining(PretrainOptions(output=str(tmp_path / "single"), **TINY | steps | dict(batch_volumes=2)))
    assert single["losses"] == pytest.approx(r0["losses"], rel=1e-5)
    ref = single["model"].state_dict()
    diffs = torch.cat([(ref[k] - r0["state"][k]).abs().flatten() for k in ref])
    assert diffs.max() < 3e-4 and diffs.median() < 1e-6, (diffs.max(), diffs.median())
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoint_final.pt").state_dict()  # written by rank 0
    assert all(torch.equal(saved[k], r0["state"][k]) for k in saved)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tree, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"at step \d+.*last good checkpoint") as err:
        run_pretraining(PretrainOptions(output=str(run), steps=20, warmup=0, lr=1e30, checkpoint_every=1, **TINY))
    failed = int(str(err.value).split("at step ")[1].split(";")[0])
    assert read_checkpoint(run / "checkpoint_latest.pt")["meta"]["step"] == failed - 1
    assert not (run / "checkpoint_final.pt").exists()
    assert max(r["step"] for r in log_of(run)) == failed - 1


def test_corrupted_case_is_named_or_skipped(tree, nnunet_dirs, tmp_path, capsys):
    src = tree["root"] / "nnUNet_preprocessed" / "Dataset501_Unlabelled"
    dst = nnunet_dirs["nnUNet_preprocessed"] / src.name
    shutil.copytree(src, dst)
    bad = dst / "nnUNetPlans_himaePretrain_3d_fullres_zlin" / "lung.b2nd"
    bad.write_bytes(bad.read_bytes()[:200])
    args = ["pretrain", *CLI_TINY, "--steps", "2", "--workers", "0"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "lung" in err and "--skip-bad-cases" in err and not (tmp_path / "a").exists()
    assert main([*args, "--output", str(tmp_path / "b"), "--skip-bad-cases"]) == 0
    assert "skipping bad case" in capsys.readouterr().out and "2 cases" in (tmp_path / "b" / "config.json").read_text()


def no_decay_names(model, groups) -> set:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}


@pytest.mark.parametrize("pos_embed", ["sincos", "learnable"])
def test_pretraining_and_finetuning_optimizers_agree_on_what_decays(pos_embed):
    """One rule (core.optim, declared by the models): the two optimizers leave the same encoder parameters
    undecayed, i.e. biases, norms, the cls token and a learnable position table, and decay the rest."""
    from himae_nnunet.core.optim import adamw_param_groups
    from himae_nnunet.models import UNETR
    from himae_nnunet.models.hiend_mae import HiEndMAE
    from himae_nnunet.models.presets import model_config
    from himae_nnunet.trainers.finetune import param_groups as finetune_groups
    mae = HiEndMAE(model_config("vit_tiny", crop_size=32, pos_embed=pos_embed))
    unetr = UNETR(1, 3, preset="vit_tiny", patch_size_voxels=(32, 32, 32), feature_size=4, pos_embed=pos_embed)
    pre = no_decay_names(mae, adamw_param_groups(mae, 0.05))
    fine = no_decay_names(unetr, finetune_groups(unetr, 1e-5, layer_decay=0.75))
    encoder = {n for n, _ in mae.named_parameters() if n.startswith("encoder.")}
    assert encoder == {n for n, _ in unetr.named_parameters() if n.startswith("encoder.")}
    assert pre & encoder == fine & encoder
    expected = {n for n in encoder if n.endswith((".bias", "norm.weight", "norm1.weight", "norm2.weight"))}
    expected |= {"encoder.cls_token"} | ({"encoder.pos_embed"} if pos_embed == "learnable" else set())
    assert pre & encoder == expected
    assert "mask_token" in pre and "decoder.head.weight" not in pre and "decoder.seg_layers.bias" in fine
    assert not any(n.endswith(("qkv.weight", "fc1.weight", "patch_embed.proj.weight")) for n in pre | fine)


def test_one_warmup_cosine_schedule_for_both_loops():
    """Pretraining's per-step LambdaLR and fine-tuning's per-epoch scheduler follow the same curve."""
    from himae_nnunet.core.schedule import warmup_decay_factor
    from himae_nnunet.trainers.finetune import WarmupDecayLR
    total, warmup = 40, 4
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    finetune = WarmupDecayLR(opt, 1e-4, num_epochs=total, warmup_epochs=warmup)
    curve = []
    for epoch in range(total):
        finetune.step(epoch)
        curve.append(opt.param_groups[0]["lr"])
    factors = [warmup_decay_factor(s, total, warmup) for s in range(total)]
    assert curve == [1e-4 * f for f in factors]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0 and factors[22] == pytest.approx(0.5)
    assert warmup_decay_factor(total, total, warmup, base_lr=1e-4, min_lr=1e-5) == pytest.approx(0.1)
    assert warmup_decay_factor(total + 5, total, warmup, decay="poly") == 0.0


def test_learnable_position_embedding_and_the_batch_warning(tree, tmp_path, capsys):
    """--pos-embed learnable trains the encoder's table (recorded in the checkpoint, undecayed, part of the
    run's identity); a global batch other than the paper's 192 crops at its lr 1e-4 is warned about."""
    run = tmp_path / "learnable"
    args = ["pretrain", *CLI_TINY, "--steps", "2", "--checkpoint-every", "2", "--workers", "0", "--output", str(run)]
    assert main([*args, "--pos-embed", "learnable"]) == 0
    captured = capsys.readouterr()
    assert "learnable position embedding" in captured.out
    assert "warning: the paper's learning rate 0.0001 belongs to its global batch of 192 crops/step" in captured.err
    assert "this run uses lr 0.0001 with 2 crops/step (1 process(es) x 1 volumes x 2 crops" in captured.err
    assert "no linear scaling" in captured.err and "would give --lr 1.04e-06" in captured.err
    model = load_checkpoint(run / "checkpoint_final.pt")
    assert model.meta["model"]["pos_embed"] == "learnable"
    assert isinstance(model.encoder.pos_embed, torch.nn.Parameter)
    state = torch.load(run / "checkpoint_latest.pt", weights_only=True)
    saved_table = state["state_dict"]["encoder.pos_embed"]
    assert 0.01 < saved_table.std() < 0.03  # normal(0, 0.02), as the authors initialise it, after 2 steps
    no_decay = state["training"]["optimizer"]["param_groups"][1]
    n_nodecay = sum(1 for n, p in model.named_parameters() if p.ndim < 2 or n.endswith(("token", "pos_embed")))
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == n_nodecay
    assert main([*args, "--steps", "3", "--resume"]) == 2  # the default sincos is another run
    assert "pos_embed (saved 'learnable')" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "other_lr"), "--lr", "2e-4"]) == 0
    assert "the paper's learning rate" not in capsys.readouterr().err  # a chosen learning rate is the user's call
