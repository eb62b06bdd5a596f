"""The demo's closing table (Dice per label, time per stage) and figures (reconstruction, overlays, losses)."""
import json
import re
import shutil
from pathlib import Path

import numpy as np

from himae_nnunet.core.errors import UserError
from himae_nnunet.demo.settings import DATASET, PLANS, TRAINERS


def dataset_from_folder(src: Path, raw: Path) -> None:
    """Copy a user's labelled dataset (nnU-Net raw layout with imagesTs/labelsTs) into the demo's raw folder."""
    need = ["dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs"]
    missing = [n for n in need if not (src / n).exists()]
    if missing:
        raise UserError(f"--data {src} lacks {', '.join(missing)}; give a folder in nnU-Net's raw layout "
                        f"(dataset.json, imagesTr, labelsTr) plus test scans and labels in imagesTs and labelsTs")
    if raw.exists():
        shutil.rmtree(raw)
    shutil.copytree(src, raw)


def dice_table(summary: Path) -> dict:
    """{label: Dice} from nnUNetv2_evaluate_folder's summary.json."""
    s = json.loads(summary.read_text())
    return {int(k): v["Dice"] for k, v in s["mean"].items()}


def foreground_scores(summary: Path) -> dict:
    """{(case, label): Dice} of the foreground labels, from nnUNetv2_evaluate_folder's per-case results."""
    s = json.loads(summary.read_text())
    return {(Path(c["reference_file"]).name, int(k)): m["Dice"] for c in s["metric_per_case"]
            for k, m in c["metrics"].items() if int(k) != 0}


def comparison(work: Path) -> dict:
    """Mean Dice with 95 % bootstrap interval per network over test cases x labels, and the paired difference
    Hi-End-MAE - scratch (bootstrap interval, Wilcoxon p), with a plain verdict."""
    from himae_nnunet.evidence.stats import bootstrap_mean_ci, paired_comparison
    scores = {name: foreground_scores(work / "predictions" / tr / "summary.json") for name, tr in TRAINERS.items()}
    (a, sa), (b, sb) = scores.items()
    units = sorted(set(sa) & set(sb))
    diff = paired_comparison([sa[u] for u in units], [sb[u] for u in units])
    if not diff["n"]:
        verdict = "no test case holds a label both networks could be scored on"
    elif diff["ci_low"] <= 0 <= diff["ci_high"]:
        verdict = (f"within noise: the 95 % interval of the difference contains 0, so these {diff['n']} scores "
                   f"(test cases x labels) cannot tell {a} from {b}. For evidence, use `himae-nnunet compare` "
                   f"(seeded few-shot draws, paired tests; docs/evidence.md)")
    else:
        better = a if diff["mean_diff"] > 0 else b
        verdict = (f"{better} is ahead on these {diff['n']} scores (interval excludes 0), but from one training "
                   f"run per network and {len({u[0] for u in units})} test scans only")
    return dict(mean={name: bootstrap_mean_ci(list(v.values())) for name, v in scores.items()},
                difference=dict(arm=a, reference=b, **diff), verdict=verdict)


def training_losses(fold_dir: Path) -> dict:
    """train/val loss and pseudo Dice per epoch, read from nnU-Net's plain-text training log."""
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    text = logs[-1].read_text() if logs else ""
    get = lambda key: [float(v) for v in re.findall(rf"{key} (-?[\d.]+(?:e-?\d+)?)", text)]  # noqa: E731
    return {"train": get("train_loss"), "val": get("val_loss")}


def loss_figure(demo, ckpt: Path, out: Path) -> None:
    """Pretraining (log.jsonl) and fine-tuning (nnU-Net's log) loss curves side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [json.loads(line) for line in (ckpt.parent / "log.jsonl").read_text().splitlines() if line.strip()]
    axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1)
    axes[0].set(title="Hi-End-MAE pretraining", xlabel="step", ylabel="masked-patch MSE")
    for name, tr in TRAINERS.items():
        fold = demo.work / "nnUNet_results" / DATASET / f"{tr}__{PLANS}__3d_fullres" / f"fold_{demo.fold}"
        losses = training_losses(fold)
        line, = axes[1].plot(losses["train"], label=f"{name} train")
        axes[1].plot(losses["val"], "--", color=line.get_color(), label=f"{name} val")
    axes[1].set(title="fine-tuning: nnU-Net's loss on training patches", xlabel="epoch", ylabel="Dice + CE loss")
    axes[1].text(0.02, 0.02, "fit to the training scans (a third of the patches\ncentred on labels), not test "
                 "accuracy:\nthe Dice table scores the unseen test scans", transform=axes[1].transAxes, fontsize=7,
                 va="bottom")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def protocol_line(demo) -> str:
    cases = f"{demo.train_cases} labelled training scan(s)" if demo.train_cases else "nnU-Net's fold 0"
    if demo.protocol == "frozen":
        return (f"frozen encoder on {cases}: both UNETRs train only their decoder on a fixed encoder (pretrained "
                f"or random), so the difference is what pretraining put into the encoder")
    return f"full fine-tuning on {cases}: every weight of both UNETRs trains"


def print_summary(demo, results: dict, stats: dict, labels: dict, figs: dict, total_s: float) -> None:
    print("\n" + "=" * 72)
    print(f"himae-nnunet demo finished in {total_s / 60:.1f} min  ({demo.work})")
    print(f"protocol: {protocol_line(demo)}")
    print("\nDice per label on the held-out test scans (nnUNetv2_evaluate_folder):")
    names = list(results)
    print(f"  {'label':18s}" + "".join(f"{n:>16s}" for n in names))
    for lab in sorted(next(iter(results.values()))):
        print(f"  {labels.get(lab, str(lab)):18s}" + "".join(f"{results[n][lab]:16.3f}" for n in names))
    print(f"  {'mean':18s}" + "".join(f"{np.nanmean(list(results[n].values())):16.3f}" for n in names))
    print("\nMean foreground Dice, 95 % bootstrap interval over test scans x labels:")
    for name, m in stats["mean"].items():
        print(f"  {name:18s} {m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]  ({m['n']} scores)")
    d = stats["difference"]
    if d["n"]:
        print(f"  {d['arm']} - {d['reference']}: {d['mean_diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], "
              f"Wilcoxon p = {d['p_wilcoxon']:.2f}")
    print(f"  verdict: {stats['verdict']}")
    print("  (the fine-tuning loss in loss_curves.png is the fit to the training scans; a lower training loss "
          "with a level Dice table means a closer fit that does not carry over to the test scans)")
    print("\nTime per stage:")
    for stage, t in demo.times.items():
        print(f"  {stage:32s} {t:7.1f} s")
    print("\nFigures:")
    for name, path in figs.items():
        print(f"  {name:16s} {path}")


def write_report(demo, raw: Path, ckpt: Path, total_s: float) -> dict:
    labels = {v: k for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items()}
    results = {name: dice_table(demo.work / "predictions" / tr / "summary.json") for name, tr in TRAINERS.items()}
    figs = {}
    previews = sorted((ckpt.parent / "previews").glob("*.png"))
    if previews:
        figs["reconstruction"] = demo.figures / "pretraining_reconstruction.png"
        shutil.copy(previews[-1], figs["reconstruction"])
    figs["losses"] = demo.figures / "loss_curves.png"
    loss_figure(demo, ckpt, figs["losses"])
    figs["overlays"] = demo.figures / "prediction_overlays.png"
    overlay_figure(raw, demo.work / "predictions", figs["overlays"], labels)
    stats = comparison(demo.work)
    print_summary(demo, results, stats, labels, figs, total_s)
    report = {"protocol": demo.protocol, "train_cases": demo.train_cases, "fold": demo.fold, "dice": results,
              "comparison": stats, "times_s": demo.times, "figures": {k: str(v) for k, v in figs.items()},
              "total_s": total_s}
    (demo.work / "demo_results.json").write_text(json.dumps(report, indent=2))
    return report


def overlay_figure(raw: Path, predictions: Path, out: Path, label_names: dict | None = None) -> None:
    """For each test case: the axial slice with most foreground, reference and both predictions outlined; a
    legend names the label of each outline colour."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    import SimpleITK as sitk
    cases = sorted((raw / "labelsTs").glob("*.nii.gz"))
    fig, axes = plt.subplots(len(cases), 1 + len(TRAINERS), figsize=(4 * (1 + len(TRAINERS)), 4 * len(cases)),
                             squeeze=False)
    colors = ["#e41a1c", "#4daf4a", "#377eb8", "#ff7f00", "#984ea3"]
    for row, lab_path in zip(axes, cases):
        case = lab_path.name[:-len(".nii.gz")]
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(lab_path)))
        z = int(np.argmax((ref > 0).sum(axis=(1, 2))))
        panels = [("reference", ref)] + [
            (name, sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / tr / lab_path.name))))
            for name, tr in TRAINERS.items()]
        for ax, (title, seg) in zip(row, panels):
            ax.imshow(np.clip(ct[z], -175, 250), cmap="gray")
            for lab in np.unique(ref[ref > 0]):  # one colour per label id, the same in every panel
                if (seg[z] == lab).any():
                    ax.contour(seg[z] == lab, levels=[0.5], colors=colors[(int(lab) - 1) % len(colors)],
                               linewidths=1.2)
            ax.set_title(f"{case}: {title}", fontsize=9)
            ax.axis("off")
    present = sorted({int(v) for p in cases for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(p)))) if v})
    names = label_names or {}
    handles = [Line2D([], [], color=colors[(lab - 1) % len(colors)], lw=2, label=names.get(lab, f"label {lab}"))
               for lab in present]
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.savefig(out, dpi=100)
    plt.close(fig)
