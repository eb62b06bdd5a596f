"""Few-shot folds (one-shot, 1 %, 10 %, explicit cases) appended to nnU-Net's splits_final.json.

Existing folds are never changed or reordered. When the file does not exist yet and the dataset has at least
five cases, nnU-Net's own 5-fold split (seed 12345, as its trainer would create it) is written first, so that
folds 0-4 keep their usual meaning. A few-shot fold draws its training cases from a pool (every case, or the
training cases of `from_fold`) and validates on the rest of the pool (or on `from_fold`'s validation cases);
`repeats` gives that many distinct draws (seeds seed, seed + 1, ... skipping repeats of an earlier draw).
"""
import json
from pathlib import Path

import numpy as np

from himae_nnunet.core.atomic import write_text_atomic
from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import require_folder


def case_identifiers(dataset: str) -> list[str]:
    """Training case ids as nnU-Net sees them: from the raw dataset, else from a preprocessed data folder."""
    raw = Path(require_folder("nnUNet_raw")) / dataset
    if (raw / "dataset.json").is_file():
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
        return sorted(get_filenames_of_train_images_and_targets(str(raw), json.loads((raw / "dataset.json").read_text())))
    pre = require_folder("nnUNet_preprocessed") / dataset
    ids = sorted({p.name[:-len(".pkl")] for p in pre.glob("*/*.pkl")})
    if not ids:
        raise UserError(f"no cases found for {dataset} in nnUNet_raw or nnUNet_preprocessed")
    return ids


def splits_file(dataset: str) -> Path:
    return require_folder("nnUNet_preprocessed") / dataset / "splits_final.json"


def load_splits(dataset: str, ids: list[str]) -> tuple[list[dict], str | None]:
    """The current folds; nnU-Net's default 5 folds when the file is missing (>= 5 cases). Returns a note."""
    path = splits_file(dataset)
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
            raise UserError(f"{path} is not a list of {{'train': [...], 'val': [...]}} folds; fix or remove it")
        return splits, None
    if len(ids) >= 5:
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        return ([{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]}
                 for s in generate_crossval_split(ids, seed=12345, n_splits=5)],
                "wrote nnU-Net's default 5-fold split first (folds 0-4)")
    return [], f"{len(ids)} cases are too few for nnU-Net's 5-fold split: the few-shot folds start at 0"


def few_shot_folds(ids: list[str], splits: list[dict], shots: int | None = None, percent: float | None = None,
                   cases: list[str] | None = None, seed: int = 0, repeats: int = 1,
                   from_fold: int | None = None) -> list[dict]:
    """The new folds (not yet added), each {'train': [...], 'val': [...]}."""
    if from_fold is not None:
        if not 0 <= from_fold < len(splits):
            raise UserError(f"--from-fold {from_fold}: splits_final.json has {len(splits)} folds")
        pool, val_pool = list(splits[from_fold]["train"]), list(splits[from_fold]["val"])
    else:
        pool, val_pool = list(ids), list(ids)
    if cases:
        unknown = sorted(set(cases) - set(pool))
        if unknown:
            raise UserError(f"cases {unknown} are not in the pool of {len(pool)} training cases "
                            f"(e.g. {pool[:3]}); give case identifiers without _0000 and file ending")
        draws = [sorted(cases)]
    else:
        n = shots if shots is not None else max(1, round(percent / 100 * len(pool)))
        if n < 1 or (percent is not None and not 0 < percent <= 100):
            raise UserError("--shots must be >= 1 and --percent in (0, 100]")
        if n > len(pool) or (from_fold is None and n >= len(pool)):
            raise UserError(f"{n} training cases asked, but the pool has {len(pool)} cases"
                            + ("" if from_fold is not None else " and at least one must be left to validate"))
        draws, s = [], seed
        while len(draws) < repeats and s < seed + 100 * repeats:  # distinct draws, seeds seed, seed + 1, ...
            draw = sorted(np.random.RandomState(s).choice(pool, n, replace=False).tolist())
            draws += [draw] if draw not in draws else []
            s += 1
        if len(draws) < repeats:
            raise UserError(f"only {len(draws)} distinct draws of {n} from {len(pool)} cases; lower --repeats")
    folds = []
    for train in draws:
        val = sorted(set(val_pool) - set(train))
        if not val:
            raise UserError("no case is left for validation; use fewer training cases")
        folds.append({"train": train, "val": val})
    return folds


def add_folds(dataset: str, **options) -> tuple[list[tuple[int, dict, bool]], str | None]:
    """Append few-shot folds to splits_final.json (identical folds are reused, not duplicated).

    Returns ([(fold index, fold, newly added)], note)."""
    ids = case_identifiers(dataset)
    splits, note = load_splits(dataset, ids)
    result = []
    for fold in few_shot_folds(ids, splits, **options):
        same = [i for i, s in enumerate(splits) if sorted(s["train"]) == fold["train"] and sorted(s["val"]) == fold["val"]]
        if same:
            result.append((same[0], fold, False))
        else:
            splits.append(fold)
            result.append((len(splits) - 1, fold, True))
    write_text_atomic(splits_file(dataset), json.dumps(splits, indent=2))
    return result, note
