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


def training_losses(fold_dir: Path) -> dict:
    """train/val loss and pseudo Dice per epoch, read from nnU-Net's plain-text training log."""
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    text = logs[-1].read_text() if logs else ""
    get = lambda key: [float(v) for v in re.findall(rf"{key} (-?[\d.]+(?:e-?\d+)?)", text)]  # noqa: E731
    return {"train": get("train_loss"), "val": get("val_loss")}


def write_report(demo, raw: Path, ckpt: Path, total_s: float) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {v: k for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items()}
    results = {name: dice_table(demo.work / "predictions" / tr / "summary.json") for name, tr in TRAINERS.items()}
    figs = {}

    previews = sorted((ckpt.parent / "previews").glob("*.png"))
    if previews:
        figs["reconstruction"] = demo.figures / "pretraining_reconstruction.png"
        shutil.copy(previews[-1], figs["reconstruction"])

    # loss curves: pretraining (log.jsonl) and fine-tuning (nnU-Net's log) side by side
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [json.loads(line) for line in (ckpt.parent / "log.jsonl").read_text().splitlines() if line.strip()]
    axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1)
    axes[0].set(title="Hi-End-MAE pretraining", xlabel="step", ylabel="masked-patch MSE")
    for name, tr in TRAINERS.items():
        fold = demo.work / "nnUNet_results" / DATASET / f"{tr}__{PLANS}__3d_fullres" / "fold_0"
        losses = training_losses(fold)
        line, = axes[1].plot(losses["train"], label=f"{name} train")
        axes[1].plot(losses["val"], "--", color=line.get_color(), label=f"{name} val")
    axes[1].set(title="fine-tuning (nnU-Net)", xlabel="epoch", ylabel="Dice + CE loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    figs["losses"] = demo.figures / "loss_curves.png"
    fig.savefig(figs["losses"], dpi=110)
    plt.close(fig)

    figs["overlays"] = demo.figures / "prediction_overlays.png"
    overlay_figure(raw, demo.work / "predictions", figs["overlays"])

    print("\n" + "=" * 72)
    print(f"himae-nnunet demo finished in {total_s / 60:.1f} min  ({demo.work})")
    print("\nDice per label on the held-out test scans (nnUNetv2_evaluate_folder):")
    names = list(results)
    print(f"  {'label':18s}" + "".join(f"{n:>16s}" for n in names))
    for lab in sorted(next(iter(results.values()))):
        print(f"  {labels.get(lab, str(lab)):18s}" + "".join(f"{results[n][lab]:16.3f}" for n in names))
    print(f"  {'mean':18s}" + "".join(f"{np.nanmean(list(results[n].values())):16.3f}" for n in names))
    print("\nTime per stage:")
    for stage, t in demo.times.items():
        print(f"  {stage:32s} {t:7.1f} s")
    print("\nFigures:")
    for name, path in figs.items():
        print(f"  {name:16s} {path}")
    report = {"dice": results, "times_s": demo.times, "figures": {k: str(v) for k, v in figs.items()},
              "total_s": total_s}
    (demo.work / "demo_results.json").write_text(json.dumps(report, indent=2))
    return report


def overlay_figure(raw: Path, predictions: Path, out: Path) -> None:
    """For each test case: the axial slice with most foreground, reference and both predictions outlined."""
    import matplotlib.pyplot as plt
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
            for i, lab in enumerate(np.unique(ref[ref > 0])):
                if (seg[z] == lab).any():
                    ax.contour(seg[z] == lab, levels=[0.5], colors=colors[i % len(colors)], linewidths=1.2)
            ax.set_title(f"{case}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
