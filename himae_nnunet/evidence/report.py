"""The comparison's outputs from nnU-Net's evaluator: per-case table, summary, paired tests, report, figure.

per_case.csv/json   one row per cell x test case x label: nnU-Net's Dice, IoU, TP, FP, FN, n_ref, n_pred
summary.csv/json    mean foreground Dice per arm x protocol x budget, 95 % bootstrap interval over
                    test cases x labels x draws
comparisons.csv/json  each arm against `scratch` (same protocol) and `nnunet`, paired by test case, label and
                    draw (the draws share their training cases across arms): mean difference, paired bootstrap
                    interval, Wilcoxon signed-rank p
report.md, dice_vs_budget.png
nnU-Net's evaluator gives no surface distance (NSD); none is reported.
"""
import csv
import json
from pathlib import Path

from himae_nnunet.evidence.cells import NNUNET, SCRATCH, SCRATCH_PRIMUS, Cell, scratch_of
from himae_nnunet.evidence.prepare import Settings
from himae_nnunet.evidence.stats import bootstrap_mean_ci, paired_comparison

METRICS = ("Dice", "IoU", "TP", "FP", "FN", "n_ref", "n_pred")


def case_rows(out: Path, cell: Cell, folds: dict, label_names: dict) -> list[dict]:
    """Foreground rows of one finished cell's summary.json (nnUNetv2_evaluate_folder's output)."""
    summary = json.loads((out / "cells" / cell.name / "summary.json").read_text())
    train = folds[cell.budget][cell.draw]["train"]
    rows = []
    for entry in summary["metric_per_case"]:
        case = Path(entry["reference_file"]).name.split(".")[0]
        for label, metrics in entry["metrics"].items():
            rows.append(dict(arm=cell.arm, protocol=cell.protocol, budget=cell.budget, n_train=len(train),
                             draw=cell.draw, fold=cell.fold, train_cases=" ".join(train), case=case,
                             label=int(label), label_name=label_names.get(int(label), str(label)),
                             **{m: metrics.get(m) for m in METRICS}))
    return rows


def label_names(raw_dataset_json: dict) -> dict:
    return {int(v): k for k, v in raw_dataset_json["labels"].items() if not isinstance(v, list)}


def unit_key(row: dict) -> tuple:
    return row["case"], row["label"], row["draw"]


def scores(rows: list[dict], arm: str, protocol: str, budget: str) -> dict:
    return {unit_key(r): float("nan") if r["Dice"] is None else float(r["Dice"]) for r in rows
            if r["arm"] == arm and r["protocol"] == protocol and r["budget"] == budget}


def groups(rows: list[dict]) -> list[tuple[str, str, str]]:
    seen = []
    for r in rows:
        key = (r["arm"], r["protocol"], r["budget"])
        if key not in seen:
            seen.append(key)
    return seen


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for arm, protocol, budget in groups(rows):
        values = list(scores(rows, arm, protocol, budget).values())
        n_train = next(r["n_train"] for r in rows if r["budget"] == budget)
        out.append(dict(arm=arm, protocol=protocol, budget=budget, n_train=n_train,
                        draws=len({r["draw"] for r in rows if (r["arm"], r["protocol"], r["budget"]) ==
                                   (arm, protocol, budget)}), **bootstrap_mean_ci(values)))
    return out


def per_label(rows: list[dict]) -> list[dict]:
    """Mean Dice per label over draws (and test cases), per arm x protocol x budget: which organs are found."""
    import numpy as np
    out = []
    for arm, protocol, budget in groups(rows):
        mine = [r for r in rows if (r["arm"], r["protocol"], r["budget"]) == (arm, protocol, budget)]
        names = list(dict.fromkeys(r["label_name"] for r in mine))
        means = {n: float(np.nanmean([np.nan if r["Dice"] is None else r["Dice"] for r in mine
                                      if r["label_name"] == n])) for n in names}
        out.append(dict(arm=arm, protocol=protocol, budget=budget, **means))
    return out


def compare_all(rows: list[dict], primus_arms: set = frozenset()) -> list[dict]:
    """Every arm against its scratch arm (same network and protocol) and against nnunet (full), on their common
    units."""
    out = []
    for arm, protocol, budget in groups(rows):
        refs = [] if arm in (SCRATCH, SCRATCH_PRIMUS, NNUNET) else [(scratch_of(arm, primus_arms), protocol)]
        for ref, ref_protocol in refs + ([] if arm == NNUNET else [(NNUNET, "full")]):
            if (ref, ref_protocol, budget) not in groups(rows):
                continue
            a, b = scores(rows, arm, protocol, budget), scores(rows, ref, ref_protocol, budget)
            common = sorted(set(a) & set(b))
            res = paired_comparison([a[k] for k in common], [b[k] for k in common])
            out.append(dict(arm=arm, protocol=protocol, budget=budget, reference=f"{ref} ({ref_protocol})", **res))
    return out


def write_table(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)


def write_report(out: Path, s: Settings, folds: dict, cells: list[Cell]) -> list[Path]:
    """All outputs from the finished cells (unfinished ones are listed as missing in report.md)."""
    from himae_nnunet.evidence.figure import plot_dice_vs_budget
    from himae_nnunet.evidence.markdown import report_markdown
    raw_json = json.loads((out / "nnUNet_preprocessed" / s.dataset / "dataset.json").read_text())
    finished = [c for c in cells if (out / "cells" / c.name / "cell.json").is_file()]
    rows = [r for c in finished for r in case_rows(out, c, folds, label_names(raw_json)) if r["label"] != 0]
    primus_arms = {c.arm for c in cells if c.pretrained_weights}
    summary, comparisons = summarize(rows), compare_all(rows, primus_arms)
    written = []
    for stem, table in (("per_case", rows), ("summary", summary), ("comparisons", comparisons)):
        write_table(out / f"{stem}.csv", table)
        (out / f"{stem}.json").write_text(json.dumps(table, indent=1))
        written += [out / f"{stem}.csv", out / f"{stem}.json"]
    times = [json.loads((out / "cells" / c.name / "cell.json").read_text())["seconds"] for c in finished]
    (out / "report.md").write_text(report_markdown(s, folds, summary, comparisons, per_label(rows), times,
                                                   [c.name for c in cells if c not in finished]))
    written.append(out / "report.md")
    if summary:
        plot_dice_vs_budget(summary, out / "dice_vs_budget.png")
        written.append(out / "dice_vs_budget.png")
    return written
