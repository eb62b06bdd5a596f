"""Setting up a comparison: its own nnU-Net folders, one plans file per arm x protocol, the few-shot folds.

Everything is written inside the output folder (its own nnUNet_preprocessed and nnUNet_results; nnUNet_raw is
only read), so a comparison never touches a user's plans, data or trained models. Each step leaves a marker
when it has finished; a step without its marker is redone from the start.

A Primus checkpoint (`pretrain --model primus_*`) makes a Primus arm: its Primus plans, a full-network file for
nnU-Net's stock Primus trainer (`export-pretrained`), and the matching scratch arm `scratch_primus` (the same
trainer and plans without the file). The stock Primus trainers cannot freeze the encoder: Primus arms run `full`.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import CONFIGURATION, dataset_id


BIN = Path(sys.executable).parent
PROTOCOLS = ("full", "frozen")
NNUNET_PLANS = "Compare_nnunet"


@dataclass
class Settings:
    """Everything that defines a comparison; stored as compare.json so a re-run can refuse other settings."""
    dataset: str  # DatasetXXX_Name
    pretrained: dict  # arm name -> checkpoint path
    shots: list = field(default_factory=list)
    percent: list = field(default_factory=list)
    draws: int = 3
    seed: int = 0
    protocols: list = field(default_factory=lambda: list(PROTOCOLS))
    scratch: bool = True
    nnunet: bool = True
    patch_size: list | None = None
    batch_size: int = 2
    feature_size: int = 16
    epochs: int = 10
    iterations_per_epoch: int = 25
    val_iterations_per_epoch: int = 5
    lr: float | None = None
    warmup_epochs: int | None = None
    tta_mirroring: bool = False
    device: str = "cpu"
    num_processes: int = 1

    def vit_plans_name(self, arm: str, protocol: str) -> str:
        return f"Compare_{arm}_{protocol}"

    def budget(self) -> dict:
        return dict(num_epochs=self.epochs, iterations_per_epoch=self.iterations_per_epoch,
                    val_iterations_per_epoch=self.val_iterations_per_epoch, tta_mirroring=self.tta_mirroring)


def nnunet_env(out: Path, device: str) -> dict:
    """This process's environment with the comparison's own preprocessed/results folders and our trainers."""
    from himae_nnunet.vit_plans.cli import with_ext_trainer_env
    (out / "nnUNet_preprocessed").mkdir(parents=True, exist_ok=True)
    (out / "nnUNet_results").mkdir(parents=True, exist_ok=True)
    os.environ["nnUNet_preprocessed"] = str(out / "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = str(out / "nnUNet_results")
    with_ext_trainer_env()
    if device == "cpu":
        os.environ.setdefault("nnUNet_compile", "f")
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        os.environ.setdefault("nnUNet_def_n_proc", "1")  # else nnU-Net's validation export starts 8 processes
    return dict(os.environ)


def sh(cmd: list, log: Path, env: dict) -> float:
    """Run one command with its output in `log`; seconds taken. A failure names the command and the log."""
    cmd = [str(c) for c in cmd]
    exe = BIN / cmd[0] if (BIN / cmd[0]).exists() else cmd[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run([str(exe), *cmd[1:]], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise UserError(f"`{' '.join(cmd)}` failed (exit {code}); full log {log}; its end:\n{tail}"
                        f"fix the cause and re-run the same compare command: finished steps are kept")
    return time.time() - start


def check_settings(out: Path, settings: Settings) -> None:
    """First run: store the settings. Later runs: refuse different ones (the cells would not be comparable)."""
    path = out / "compare.json"
    mine = json.loads(json.dumps(asdict(settings)))
    if path.is_file():
        stored = json.loads(path.read_text())
        diff = sorted(k for k in set(mine) | set(stored) if mine.get(k) != stored.get(k))
        if diff:
            raise UserError(f"{out} holds a comparison made with other settings ({', '.join(diff)} differ: "
                            f"{ {k: stored.get(k) for k in diff} }); re-run with those, or choose a new -o")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2))


def once(out: Path, name: str, step) -> None:
    """Run `step()` unless its marker exists; the marker is written only after it returns."""
    marker = out / "setup" / f"{name}.done"
    if marker.is_file():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    step()
    marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))


def prepare_plans(out: Path, s: Settings, env: dict) -> None:
    """Base nnU-Net plans, ViT plans per pretrained arm x protocol, nnU-Net budget plans; preprocessed data."""
    ds_id, logs = str(dataset_id(s.dataset)), out / "setup"
    if env.get("nnUNet_n_proc_DA", "1").strip() in ("0", ""):  # nnU-Net's planner sets torch threads from it
        env = {**env, "nnUNet_n_proc_DA": "1"}
    once(out, "nnUNetPlans", lambda: (
        sh(["nnUNetv2_extract_fingerprint", "-d", ds_id, "-np", s.num_processes], logs / "plan_nnunet.log", env),
        sh(["nnUNetv2_plan_experiment", "-d", ds_id], logs / "plan_nnunet.log", env)))
    for arm, ckpt in s.pretrained.items():
        kind = encoder_kind(ckpt)
        for protocol in arm_protocols(s, kind):
            name = s.vit_plans_name(arm, protocol)
            once(out, name, lambda arm=arm, ckpt=ckpt, protocol=protocol, name=name: sh(
                vit_plan_command(s, ckpt, name, protocol), logs / f"plan_{name}.log", env))
        if kind == "primus":
            once(out, f"{s.vit_plans_name(arm, 'full')}_weights", lambda arm=arm: export_primus_weights(out, s, arm, env))
    if s.nnunet:
        once(out, NNUNET_PLANS, lambda: write_nnunet_plans(out, s, env))


def encoder_kind(checkpoint: str) -> str:
    """"vit" or "primus", from the checkpoint's meta."""
    from himae_nnunet.vit_plans.weights import read_pretrained
    return read_pretrained(checkpoint)[1]["model"].get("encoder", "vit")


def arm_protocols(s: Settings, kind: str) -> list:
    return [p for p in s.protocols if kind == "vit" or p == "full"]


def primus_weights(out: Path, s: Settings, arm: str) -> Path:
    return out / "setup" / f"{s.vit_plans_name(arm, 'full')}.pth"


def export_primus_weights(out: Path, s: Settings, arm: str, env: dict) -> None:
    name = s.vit_plans_name(arm, "full")
    sh(["himae-nnunet", "export-pretrained", "--plans", out / "nnUNet_preprocessed" / s.dataset / f"{name}.json",
        "-o", primus_weights(out, s, arm), "--overwrite"], out / "setup" / f"plan_{name}.log", env)


def vit_plan_command(s: Settings, ckpt: str, plans_name: str, protocol: str) -> list:
    cmd = ["himae-nnunet", "plan", str(dataset_id(s.dataset)), "--checkpoint", ckpt, "--plans-name", plans_name,
           "--batch-size", s.batch_size, "--feature-size", s.feature_size, "--epochs", s.epochs,
           "--iterations-per-epoch", s.iterations_per_epoch, "--val-iterations-per-epoch", s.val_iterations_per_epoch,
           "--freeze-encoder-epochs", s.epochs if protocol == "frozen" else 0, "--overwrite", "--preprocess",
           "-np", s.num_processes]
    cmd += ["--patch-size", *s.patch_size] if s.patch_size else []
    cmd += ["--lr", s.lr] if s.lr is not None else []
    cmd += ["--warmup-epochs", s.warmup_epochs] if s.warmup_epochs is not None else []
    return cmd + ([] if s.tta_mirroring else ["--no-tta-mirroring"])


def write_nnunet_plans(out: Path, s: Settings, env: dict) -> None:
    """A copy of nnUNetPlans (3d_fullres only, same network and data folder) carrying the shared budget; the
    shared patch and batch size when the network's pooling allows them, else nnU-Net's own."""
    import math
    folder = out / "nnUNet_preprocessed" / s.dataset
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"][CONFIGURATION]
    strides = cfg["architecture"]["arch_kwargs"]["strides"]
    factor = [math.prod(st[axis] for st in strides) for axis in range(3)]
    patch = s.patch_size or shared_vit_patch(out, s)
    if all(p % f == 0 for p, f in zip(patch, factor)):
        cfg["patch_size"], cfg["batch_size"] = list(patch), s.batch_size
    else:
        print(f"note: the shared patch {patch} does not fit nnU-Net's pooling {factor}; the nnunet arm keeps "
              f"nnU-Net's patch {cfg['patch_size']}")
    plans.update(plans_name=NNUNET_PLANS, configurations={CONFIGURATION: cfg},
                 himae=dict(finetune=s.budget(), note="budget for nnUNetTrainer_HimaeBudget (himae-nnunet compare)"))
    (folder / f"{NNUNET_PLANS}.json").write_text(json.dumps(plans, indent=2))
    sh(["nnUNetv2_preprocess", "-d", str(dataset_id(s.dataset)), "-plans_name", NNUNET_PLANS, "-c", CONFIGURATION,
        "-np", s.num_processes], out / "setup" / f"plan_{NNUNET_PLANS}.log", env)


def shared_vit_patch(out: Path, s: Settings) -> list:
    first = next(iter(s.pretrained))
    name = s.vit_plans_name(first, arm_protocols(s, encoder_kind(s.pretrained[first]))[0])
    plans = json.loads((out / "nnUNet_preprocessed" / s.dataset / f"{name}.json").read_text())
    return plans["configurations"][CONFIGURATION]["patch_size"]


def budgets(s: Settings) -> list[tuple[str, dict]]:
    return [(f"{n}-shot", dict(shots=n)) for n in s.shots] + [(f"{p:g}%", dict(percent=p)) for p in s.percent]


def make_folds(out: Path, s: Settings) -> dict:
    """{budget label: [{'fold': i, 'train': [...], 'val': [...]}] x draws}, appended to splits_final.json once."""
    path = out / "setup" / "folds.json"
    if path.is_file():
        return json.loads(path.read_text())
    from himae_nnunet.vit_plans.splits import add_folds
    folds = {}
    for label, option in budgets(s):
        added, _ = add_folds(s.dataset, seed=s.seed, repeats=s.draws, **option)
        folds[label] = [dict(fold=index, **fold) for index, fold, _ in added]
    path.write_text(json.dumps(folds, indent=2))
    return folds
