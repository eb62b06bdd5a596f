"""`himae-nnunet demo`: the whole product on a small synthetic CT dataset (or your scans), in minutes on a CPU.

raw scans -> nnU-Net plans -> pretraining data -> Hi-End-MAE pretraining -> checkpoint -> ViT plans ->
fine-tuning (pretrained and from scratch) -> nnU-Net prediction -> evaluation -> table and figures.
Every stage runs the real command a user would type; its output goes to the console and to a log file.
By default both UNETRs keep their encoder frozen (`--protocol frozen`), the setting in which a CPU budget of
minutes shows what pretraining put into the encoder (docs/benchmarks.md); `--train-cases N` adds a few-shot fold.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from himae_nnunet.core.errors import UserError
from himae_nnunet.demo.settings import DATASET, DATASET_ID, NUM_TEST, PLANS, TRAINERS



class StageFailed(UserError):
    pass


class Demo:
    def __init__(self, workdir: Path, device: str, data: Path | None, steps: int, epochs: int, iterations: int,
                 protocol: str = "frozen", train_cases: int | None = None):
        self.work, self.device, self.data, self.steps = workdir.resolve(), device, data, steps
        self.epochs, self.iterations = epochs, iterations
        self.protocol, self.train_cases = protocol, train_cases
        self.fold = "0"  # nnU-Net's fold 0, or the few-shot fold `split` adds (see few_shot_fold)
        self.logs = self.work / "logs"
        self.figures = self.work / "figures"
        self.times: dict[str, float] = {}
        self.env = dict(os.environ)
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            self.env[var] = str(self.work / var)
        from himae_nnunet.vit_plans.cli import ext_trainer_path
        self.env.update(nnUNet_extTrainer=ext_trainer_path(), nnUNet_compile="f", nnUNet_n_proc_DA="1",
                        PYTHONUNBUFFERED="1")

    def run(self, n: int, total: int, name: str, cmd: list[str]) -> None:
        """Run one stage's command, echoing its output and keeping it in logs/NN_name.log."""
        log = self.logs / f"{n:02d}_{name.replace(' ', '_')}.log"
        print(f"\n=== [{n}/{total}] {name}: {' '.join(cmd)}\n    (log: {log})", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=self.work)
            for line in proc.stdout:
                f.write(line)
                sys.stdout.write(line)
                sys.stdout.flush()
            proc.wait()
        self.times[name] = time.time() - t0
        if proc.returncode != 0:
            raise StageFailed(f"stage '{name}' failed (exit code {proc.returncode}); see {log}")

    def main(self) -> dict:
        marker = self.work / ".himae_demo"
        if self.work.exists() and any(self.work.iterdir()):
            if not marker.exists():
                raise UserError(f"--workdir {self.work} exists and holds files the demo did not write; give an "
                                f"empty or new folder")
            print(f"removing the previous demo run in {self.work}")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        marker.touch()
        for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs", "figures", "predictions"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        raw = self.make_raw_dataset()
        bindir = Path(sys.executable).parent  # nnU-Net's commands sit beside our interpreter, even unactivated
        nn = lambda tool: [str(bindir / tool) if (bindir / tool).exists() else shutil.which(tool) or tool]  # noqa
        # our console script, not `python -m`: run inside a source checkout, `-m` would import the checkout's
        # folder (which lacks pretrain/ and trainers/) instead of the installed package
        exe = nn("himae-nnunet") if (bindir / "himae-nnunet").exists() else [sys.executable, "-m", "himae_nnunet.cli"]
        ckpt = self.work / "pretrain" / "checkpoint_final.pt"
        stages = self.preparation_stages(exe, nn, ckpt)
        total = len(stages) + 3 * len(TRAINERS)
        for i, (name, cmd) in enumerate(stages, 1):
            self.run(i, total, name, cmd)
        if self.train_cases:
            self.fold = self.few_shot_fold()
        for i, (name, cmd) in enumerate(self.fine_tuning_stages(nn, raw), len(stages) + 1):
            self.run(i, total, name, cmd)
        from himae_nnunet.demo.report import write_report
        return write_report(self, raw, ckpt, time.time() - t0)

    def preparation_stages(self, exe, nn, ckpt: Path) -> list[tuple[str, list[str]]]:
        """Pretraining data, pretraining, nnU-Net planning, ViT plans (+ preprocessing), the few-shot fold."""
        stages = [
            ("prepare pretraining data", exe + ["prepare-pretrain", "--dataset", str(DATASET_ID), "-np", "2",
                                                "--crop-size", "64"]),
            ("pretrain", exe + ["pretrain", "--dataset", str(DATASET_ID), "--output", str(ckpt.parent),
                                "--model", "vit_tiny", "--crop-size", "64", "--steps", str(self.steps),
                                "--warmup", str(max(1, self.steps // 10)), "--lr", "1e-3", "--batch-volumes", "2",
                                "--crops-per-volume", "4", "--checkpoint-every", str(max(1, self.steps // 2)),
                                "--workers", "1", "--device", self.device]),
            ("nnU-Net planning", nn("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", "3d_fullres",
                                                                       "-np", "2", "--verify_dataset_integrity"]),
            ("ViT plans", exe + ["plan", str(DATASET_ID), "--checkpoint", str(ckpt), "--plans-name", PLANS,
                                 "--patch-size", "48", "48", "48", "--batch-size", "2", "--feature-size", "16",
                                 "--epochs", str(self.epochs), "--iterations-per-epoch", str(self.iterations),
                                 "--val-iterations-per-epoch", "5",
                                 "--freeze-encoder-epochs", str(self.epochs if self.protocol == "frozen" else 0),
                                 "--lr", "3e-4", "--no-tta-mirroring", "--preprocess", "-np", "2",
                                 "--overwrite"]),
        ]
        if self.train_cases:
            stages.append(("few-shot fold", exe + ["split", str(DATASET_ID), "--shots", str(self.train_cases)]))
        return stages

    def few_shot_fold(self) -> str:
        """The fold `himae-nnunet split` just appended (the last one of splits_final.json)."""
        splits = json.loads((self.work / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())
        return str(len(splits) - 1)

    def fine_tuning_stages(self, nn, raw: Path) -> list[tuple[str, list[str]]]:
        """Train, predict the test scans, evaluate: for each network, on the same fold and plans."""
        stages = []
        for label, trainer in TRAINERS.items():
            stages.append((f"train {label}", nn("nnUNetv2_train") + [str(DATASET_ID), "3d_fullres", self.fold, "-tr",
                                                                  trainer, "-p", PLANS, "-device", self.device]))
            out = self.work / "predictions" / trainer
            stages.append((f"predict {label}", nn("nnUNetv2_predict") + [
                "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres", "-f",
                self.fold, "-tr", trainer, "-p", PLANS, "-device", self.device, "-npp", "1", "-nps", "1",
                "--disable_tta"]))
            stages.append((f"evaluate {label}", nn("nnUNetv2_evaluate_folder") + [
                str(raw / "labelsTs"), str(out), "-djfile", str(raw / "dataset.json"),
                "-pfile", str(self.work / "nnUNet_preprocessed" / DATASET / f"{PLANS}.json")]))
        return stages

    def make_raw_dataset(self) -> Path:
        from himae_nnunet.demo.synthetic import write_dataset
        raw = self.work / "nnUNet_raw" / DATASET
        t0 = time.time()
        if self.data is not None:
            from himae_nnunet.demo.report import dataset_from_folder
            dataset_from_folder(self.data, raw)
        elif not (raw / "dataset.json").exists():
            print(f"=== [0] synthetic CT dataset: 8 training and {NUM_TEST} test scans with liver, spleen, kidney "
                  f"labels")
            write_dataset(self.work / "nnUNet_raw", DATASET_ID, "HiEndDemo", num_cases=8, num_test=NUM_TEST, seed=0)
        self.times["make dataset"] = time.time() - t0
        return raw


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole workflow on a small synthetic CT dataset (minutes on a CPU)")
    p.add_argument("--workdir", default="himae_demo", help="folder for everything the demo writes (default ./himae_demo)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--data", help="your own labelled scans instead of the synthetic ones: a folder with "
                                  "imagesTr/labelsTr/imagesTs/labelsTs and dataset.json in nnU-Net's raw format")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps (default 600)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per network (default 10)")
    p.add_argument("--iterations", type=int, default=25, help="fine-tuning iterations per epoch (default 25)")
    p.add_argument("--protocol", choices=["frozen", "full"], default="frozen",
                   help="frozen: both UNETRs keep their encoder (pretrained or random) fixed and train the decoder, "
                        "the test of what pretraining put into the encoder; full: the whole network trains "
                        "(default frozen)")
    p.add_argument("--train-cases", type=int, metavar="N",
                   help="fine-tune on N labelled training scans (a few-shot fold from `himae-nnunet split`; 1 = "
                        "one-shot) instead of nnU-Net's fold 0; pretraining always sees every training scan")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-synthetic", help="write a small synthetic labelled CT dataset in nnU-Net's raw format")
    p.add_argument("--dataset-id", type=int, default=DATASET_ID)
    p.add_argument("--name", default="HiEndDemo")
    p.add_argument("--cases", type=int, default=8, help="training scans (default 8)")
    p.add_argument("--test-cases", type=int, default=2, help="test scans with labels (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="raw folder (default $nnUNet_raw)")
    p.set_defaults(func=cmd_make_synthetic)


def cmd_make_synthetic(args) -> None:
    from himae_nnunet.core.nnunet_env import require_folder, require_free_dataset_id
    from himae_nnunet.demo.synthetic import write_dataset
    raw = Path(args.output) if args.output else require_folder("nnUNet_raw")
    require_free_dataset_id(args.dataset_id, raw)
    folder = write_dataset(raw, args.dataset_id, args.name, args.cases, args.test_cases, args.seed)
    print(f"wrote {folder}: {args.cases} training scans (imagesTr/labelsTr), {args.test_cases} test scans "
          f"(imagesTs/labelsTs); labels 1 liver, 2 spleen, 3 kidney")


def cmd_demo(args) -> None:
    if args.train_cases is not None and args.train_cases < 1:
        raise UserError(f"--train-cases {args.train_cases}: give at least 1 (1 = one-shot)")
    Demo(Path(args.workdir), args.device, Path(args.data) if args.data else None, args.steps, args.epochs,
         args.iterations, args.protocol, args.train_cases).main()
