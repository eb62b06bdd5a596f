"""The cells of a comparison (arm x protocol x budget x draw) and running one through stock nnU-Net.

A cell trains with `nnUNetv2_train` on its fold, predicts the test images with `nnUNetv2_predict` and scores
them with `nnUNetv2_evaluate_folder`; its folder keeps the three logs, the predictions, nnU-Net's summary.json
and, written last, cell.json. A cell with cell.json is finished and skipped; any other trace of it (a results
fold, a partial prediction) is half-finished and removed before the cell is run again.
"""
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from himae_nnunet.core.atomic import write_text_atomic
from himae_nnunet.core.nnunet_env import CONFIGURATION, dataset_id
from himae_nnunet.evidence.prepare import (NNUNET_PLANS, Settings, arm_protocols, budgets, encoder_kind,
                                           primus_weights, sh)


SCRATCH, NNUNET, SCRATCH_PRIMUS = "scratch", "nnunet", "scratch_primus"
TRAINERS = {"vit": "nnUNetTrainerHiEndMAE", SCRATCH: "nnUNetTrainerUNETR", NNUNET: "nnUNetTrainer_HimaeBudget"}


def scratch_of(arm: str, primus_arms: set) -> str:
    """The from-scratch arm a pretrained arm is compared with: the same network without pretraining."""
    return SCRATCH_PRIMUS if arm in primus_arms else SCRATCH


@dataclass(frozen=True)
class Cell:
    arm: str
    protocol: str  # "full" or "frozen"; nnU-Net's CNN has no encoder to freeze: always "full"
    budget: str  # e.g. "1-shot", "10%"
    draw: int
    fold: int
    trainer: str
    plans: str
    pretrained_weights: str | None = None  # Primus arms: the file for stock `-pretrained_weights`

    @property
    def name(self) -> str:
        return f"{self.arm}__{self.protocol}__{self.budget.replace('%', 'pct')}__draw{self.draw}"


def primus_trainer(out: Path, s: Settings, arm: str) -> str:
    """The stock Primus trainer of the arm's size, under the shared budget."""
    from himae_nnunet.vit_plans.primus_export import default_primus_trainer
    plans = json.loads((out / "nnUNet_preprocessed" / s.dataset / f"{s.vit_plans_name(arm, 'full')}.json").read_text())
    return default_primus_trainer(plans["himae"]["encoder"]) + "_HimaeBudget"


def arm_table(out: Path, s: Settings) -> list[tuple]:
    """(arm, trainer, plans name per protocol, pretrained-weights file or None, protocols) per arm."""
    kinds = {arm: encoder_kind(ckpt) for arm, ckpt in s.pretrained.items()}
    vit = [a for a in s.pretrained if kinds[a] == "vit"]
    primus = [a for a in s.pretrained if kinds[a] == "primus"]
    arms = [(SCRATCH, TRAINERS[SCRATCH], lambda p: s.vit_plans_name(vit[0], p), None, s.protocols)] \
        if s.scratch and vit else []
    arms += [(a, TRAINERS["vit"], lambda p, a=a: s.vit_plans_name(a, p), None, s.protocols) for a in vit]
    if s.scratch and primus:
        arms.append((SCRATCH_PRIMUS, primus_trainer(out, s, primus[0]), lambda p: s.vit_plans_name(primus[0], p),
                     None, ["full"]))
    arms += [(a, primus_trainer(out, s, a), lambda p, a=a: s.vit_plans_name(a, p), str(primus_weights(out, s, a)),
              arm_protocols(s, "primus")) for a in primus]
    return arms


def build_cells(s: Settings, folds: dict, out: Path) -> list[Cell]:
    """Order: budget, then protocol (frozen first: the most sensitive test of what the encoder learned), then
    draw, then arm; so an interrupted run holds complete, paired draws of the first blocks."""
    arms = arm_table(out, s)
    protocols = sorted(s.protocols, key=lambda p: p != "frozen")
    cells = []
    for label, _ in budgets(s):
        for protocol in protocols:
            for draw in range(s.draws):
                fold = folds[label][draw]["fold"]
                cells += [Cell(arm, protocol, label, draw, fold, trainer, plans(protocol), weights)
                          for arm, trainer, plans, weights, allowed in arms if protocol in allowed]
                if s.nnunet and protocol == "full":
                    cells.append(Cell(NNUNET, "full", label, draw, fold, TRAINERS[NNUNET], NNUNET_PLANS))
        if s.nnunet and "full" not in protocols:
            cells += [Cell(NNUNET, "full", label, d, folds[label][d]["fold"], TRAINERS[NNUNET], NNUNET_PLANS)
                      for d in range(s.draws)]
    return cells


def results_fold(out: Path, s: Settings, cell: Cell) -> Path:
    return out / "nnUNet_results" / s.dataset / f"{cell.trainer}__{cell.plans}__{CONFIGURATION}" / f"fold_{cell.fold}"


def run_cell(out: Path, s: Settings, raw: Path, cell: Cell, env: dict) -> dict:
    """Train, predict, evaluate one cell from a clean state; returns what cell.json holds."""
    folder, fold = out / "cells" / cell.name, results_fold(out, s, cell)
    shutil.rmtree(folder, ignore_errors=True)  # a half-finished cell starts again
    shutil.rmtree(fold, ignore_errors=True)
    folder.mkdir(parents=True)
    ds, dev = str(dataset_id(s.dataset)), s.device
    weights = ["-pretrained_weights", cell.pretrained_weights] if cell.pretrained_weights else []
    times = dict(train=sh(["nnUNetv2_train", ds, CONFIGURATION, cell.fold, "-tr", cell.trainer, "-p", cell.plans,
                           "-device", dev, *weights], folder / "train.log", env))
    times["predict"] = sh(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", folder / "predictions", "-d", ds,
                           "-c", CONFIGURATION, "-f", cell.fold, "-tr", cell.trainer, "-p", cell.plans,
                           "-chk", "checkpoint_final.pth", "-device", dev, "-npp", 1, "-nps", 1],
                          folder / "predict.log", env)
    times["evaluate"] = sh(["nnUNetv2_evaluate_folder", raw / "labelsTs", folder / "predictions", "-djfile",
                            fold.parent / "dataset.json", "-pfile", fold.parent / "plans.json", "-o",
                            folder / "summary.json", "-np", 1], folder / "evaluate.log", env)
    record = dict(asdict(cell), seconds={k: round(v, 1) for k, v in times.items()},
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_text_atomic(folder / "cell.json", json.dumps(record, indent=2))  # written last: the cell is done
    return record


def run_cells(out: Path, s: Settings, raw: Path, cells: list[Cell], env: dict, jobs: int = 1) -> list[dict]:
    """Every cell, skipping finished ones, `jobs` at a time (cells share no files); a progress bar with elapsed
    time and estimate for the rest. The first failure stops the run after the cells in flight."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
    done = {c.name: json.loads((out / "cells" / c.name / "cell.json").read_text())
            for c in cells if (out / "cells" / c.name / "cell.json").is_file()}
    todo = [c for c in cells if c.name not in done]
    print(f"{len(cells)} cells: {len(done)} finished (skipped), {len(todo)} to run", flush=True)
    with tqdm(total=len(todo), desc="compare", unit="cell") as bar, ThreadPoolExecutor(max(1, jobs)) as pool:
        def one(cell: Cell) -> None:
            done[cell.name] = run_cell(out, s, raw, cell, env)
            bar.update(1)
            bar.write(f"cell {len(done)}/{len(cells)} {cell.name}: " + ", ".join(
                f"{k} {v:.0f} s" for k, v in done[cell.name]["seconds"].items()))
        pending = [pool.submit(one, c) for c in todo]
        finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for f in pending:
                f.cancel()
            raise failed[0].exception()
    return [done[c.name] for c in cells]
