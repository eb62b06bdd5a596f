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
from himae_nnunet.evidence.prepare import NNUNET_PLANS, Settings, budgets, sh


SCRATCH, NNUNET = "scratch", "nnunet"
TRAINERS = {"vit": "nnUNetTrainerHiEndMAE", SCRATCH: "nnUNetTrainerUNETR", NNUNET: "nnUNetTrainer_HimaeBudget"}


@dataclass(frozen=True)
class Cell:
    arm: str
    protocol: str  # "full" or "frozen"; nnU-Net's CNN has no encoder to freeze: always "full"
    budget: str  # e.g. "1-shot", "10%"
    draw: int
    fold: int
    trainer: str
    plans: str

    @property
    def name(self) -> str:
        return f"{self.arm}__{self.protocol}__{self.budget.replace('%', 'pct')}__draw{self.draw}"


def build_cells(s: Settings, folds: dict) -> list[Cell]:
    """Order: budget, then protocol (frozen first: the most sensitive test of what the encoder learned), then
    draw, then arm; so an interrupted run holds complete, paired draws of the first blocks."""
    first = next(iter(s.pretrained))
    arms = ([(SCRATCH, TRAINERS[SCRATCH], lambda p: s.vit_plans_name(first, p))] if s.scratch else []) + \
           [(arm, TRAINERS["vit"], lambda p, arm=arm: s.vit_plans_name(arm, p)) for arm in s.pretrained]
    protocols = sorted(s.protocols, key=lambda p: p != "frozen")
    cells = []
    for label, _ in budgets(s):
        for protocol in protocols:
            for draw in range(s.draws):
                fold = folds[label][draw]["fold"]
                cells += [Cell(arm, protocol, label, draw, fold, trainer, plans(protocol))
                          for arm, trainer, plans in arms]
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
    times = dict(train=sh(["nnUNetv2_train", ds, CONFIGURATION, cell.fold, "-tr", cell.trainer, "-p", cell.plans,
                           "-device", dev], folder / "train.log", env))
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
