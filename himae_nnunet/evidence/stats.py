"""Statistics of a comparison: bootstrap intervals of means and of paired differences, Wilcoxon signed-rank.

The unit is one (test case, label, draw) score. Units with a NaN score (nnU-Net's Dice is NaN when a label is
absent from both reference and prediction) are left out, pairwise for the paired tests, and counted.
Percentile bootstrap, resampling units with replacement; fixed seed so that a report is reproducible.
"""
import numpy as np

N_BOOT = 10000
LEVEL = 0.95


def bootstrap_mean_ci(values, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict:
    """{'n', 'mean', 'ci_low', 'ci_high'} of the finite values (all NaN when none is finite)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return dict(n=0, mean=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return dict(n=int(x.size), mean=float(x.mean()), ci_low=float(low), ci_high=float(high))


def wilcoxon_p(differences) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; 1.0 when every difference is 0."""
    from scipy.stats import wilcoxon
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    if np.all(d == 0):
        return 1.0  # no evidence of any difference (scipy refuses this case)
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_comparison(arm, reference, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict:
    """arm - reference over matched units: mean difference, bootstrap interval, Wilcoxon p, wins/losses."""
    a, b = np.asarray(arm, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same units: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    ci = bootstrap_mean_ci(d, n_boot, level, seed)
    return dict(n=ci["n"], dropped_nan=int((~keep).sum()), mean_diff=ci["mean"], ci_low=ci["ci_low"],
                ci_high=ci["ci_high"], p_wilcoxon=wilcoxon_p(d), wins=int((d > 0).sum()), losses=int((d < 0).sum()))
