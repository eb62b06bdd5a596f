"""dice_vs_budget.png: mean foreground Dice vs label budget per arm, one panel per protocol, 95 % intervals."""
from pathlib import Path


def plot_dice_vs_budget(summary: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    protocols = sorted({r["protocol"] for r in summary}, key=["full", "frozen"].index)
    budgets = sorted({(r["n_train"], r["budget"]) for r in summary})
    xs = {b: i for i, (_, b) in enumerate(budgets)}
    arms = list(dict.fromkeys(r["arm"] for r in summary))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 4), sharey=True, squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for k, arm in enumerate(arms):
            # nnU-Net's CNN has only the full protocol; it is drawn in every panel as the reference
            pts = [r for r in summary if r["arm"] == arm and (r["protocol"] == protocol or arm == "nnunet")]
            if not pts:
                continue
            pts.sort(key=lambda r: xs[r["budget"]])
            x = [xs[r["budget"]] + (k - (len(arms) - 1) / 2) * 0.06 for r in pts]  # small dodge
            y = [100 * r["mean"] for r in pts]
            err = [[100 * (r["mean"] - r["ci_low"]) for r in pts], [100 * (r["ci_high"] - r["mean"]) for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{k}",  # one colour per arm, every panel
                        label=arm + (" (full)" if arm == "nnunet" else ""),
                        linestyle="--" if arm == "nnunet" else "-")
        ax.set_xticks(range(len(budgets)), [f"{b}\n({n} case{'s' * (n > 1)})" for n, b in budgets])
        ax.set_xlim(-0.5, len(budgets) - 0.5)  # fixed, so the dodge stays small with a single budget
        ax.set_title(f"protocol: {protocol}" + (" encoder" if protocol == "frozen" else " fine-tuning"))
        ax.set_xlabel("label budget")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("foreground Dice (%), mean and 95 % CI")
    handles = {}
    for ax in axes[0]:  # every arm once, whichever panel holds it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8)
    fig.suptitle("Dice vs label budget (nnU-Net's evaluator on the test set)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_loss_log(log_jsonl: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of a pretraining run's log.jsonl; a resumed run's rewritten steps keep their last value."""
    import json
    by_step = {}
    for line in Path(log_jsonl).read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "loss" in record and "step" in record:
            by_step[int(record["step"])] = float(record["loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_pretraining_losses(runs: dict, path: Path, window: int = 100, last_step: int | None = None) -> None:
    """Masked-patch MSE per step (faint) and its running mean over `window` steps, one line per run, up to
    `last_step` (the checkpoint used; a stopped run may have logged a few steps past it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, log in runs.items():
        steps, loss = read_loss_log(log)
        keep = [i for i, st in enumerate(steps) if last_step is None or st <= last_step]
        steps, loss = [steps[i] for i in keep], [loss[i] for i in keep]
        line, = ax.plot(steps, loss, lw=0.5, alpha=0.25)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")  # (n - window + 1,)
        ax.plot(steps[window - 1:], smooth, color=line.get_color(), lw=2, label=f"{name} ({window}-step mean)")
    ax.set(xlabel="optimizer step", ylabel="masked-patch MSE (per-patch normalized)", title="pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
