"""report.md of a comparison: settings, the table with intervals, paired comparisons, cell times."""
from himae_nnunet.evidence.prepare import Settings


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def p_value(p: float) -> str:
    return "n/a" if p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def arms_of(s: Settings, summary: list[dict]) -> list[str]:
    """The arms that have results (scratch_primus appears with Primus checkpoints), else the planned ones."""
    if summary:
        return list(dict.fromkeys(r["arm"] for r in summary))
    return (["scratch"] if s.scratch else []) + list(s.pretrained) + (["nnunet"] if s.nnunet else [])


def report_markdown(s: Settings, folds: dict, summary: list[dict], comparisons: list[dict], labels: list[dict],
                    times: list[dict], missing: list[str]) -> str:
    lines = [f"# Low-label comparison on {s.dataset}", "",
             f"Arms: {', '.join(arms_of(s, summary))}; "
             f"protocols: {', '.join(s.protocols)} (frozen: encoder LR 0 throughout, only the UNETR decoder trains; "
             f"nnU-Net's CNN is always fully trained). Shared budget: {s.epochs} epochs x {s.iterations_per_epoch} "
             f"iterations x batch {s.batch_size}, test-time mirroring {'on' if s.tta_mirroring else 'off'}.",
             "", "Training cases per draw (the same for every arm):", ""]
    for budget, draws in folds.items():
        for k, fold in enumerate(draws):
            lines.append(f"- {budget}, draw {k} (fold {fold['fold']}): {', '.join(fold['train'])}")
    lines += ["", "## Foreground Dice (%), mean and 95 % bootstrap interval over test cases x labels x draws", "",
              "| arm | protocol | budget | draws | units | mean | 95 % CI |", "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['arm']} | {r['protocol']} | {r['budget']} | {r['draws']} | {r['n']} | {pct(r['mean'])} "
                     f"| [{pct(r['ci_low'])}, {pct(r['ci_high'])}] |")
    if labels:
        names = [k for k in labels[0] if k not in ("arm", "protocol", "budget")]
        lines += ["", "## Dice (%) per label, mean over draws", "",
                  "| arm | protocol | budget | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
        lines += [f"| {r['arm']} | {r['protocol']} | {r['budget']} | " + " | ".join(pct(r[n]) for n in names) + " |"
                  for r in labels]
    lines += ["", "## Paired differences (Dice points, arm - reference), matched by test case, label and draw", "",
              "| arm | protocol | budget | reference | units | mean diff | 95 % CI | Wilcoxon p | wins/losses |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['arm']} | {c['protocol']} | {c['budget']} | {c['reference']} | {c['n']} | "
                     f"{pct(c['mean_diff'])} | [{pct(c['ci_low'])}, {pct(c['ci_high'])}] | {p_value(c['p_wilcoxon'])} "
                     f"| {c['wins']}/{c['losses']} |")
    lines += ["", "An interval that contains 0 means the data cannot tell the arms apart at this size. Units of one "
              "test case are not independent (labels and draws share the case), so intervals are optimistic when "
              "there are few test cases. Scores come from nnUNetv2_evaluate_folder only; it reports no NSD.", ""]
    if times:
        total = {k: sum(t[k] for t in times) for k in times[0]}
        lines.append(f"Cell times (s, sum over {len(times)} cells): " + ", ".join(f"{k} {v:.0f}" for k, v in total.items()))
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        lines += ["", f"**{len(missing)} cells not finished yet** (re-run the same command to complete them): "
                  + shown]
    return "\n".join(lines) + "\n"
