"""Statistics of `himae-nnunet compare` on hand-made scores, where the right answer is known."""
import math

import numpy as np
import pytest

from himae_nnunet.evidence.report import compare_all, summarize
from himae_nnunet.evidence.stats import bootstrap_mean_ci, paired_comparison, wilcoxon_p


def test_identical_arms_give_zero_difference_and_p_one():
    scores = np.random.default_rng(0).random(18)
    res = paired_comparison(scores, scores.copy())
    assert res["mean_diff"] == 0 and res["ci_low"] == 0 and res["ci_high"] == 0
    assert res["p_wilcoxon"] == 1.0 and res["wins"] == res["losses"] == 0 and res["n"] == 18


@pytest.mark.parametrize("shift", [0.08, -0.08])
def test_constant_shift_is_found_with_its_sign(shift):
    rng = np.random.default_rng(1)
    reference = rng.random(18)
    arm = reference + shift + 0.01 * rng.standard_normal(18)  # a shift with small noise around it
    res = paired_comparison(arm, reference)
    assert math.copysign(1, res["mean_diff"]) == math.copysign(1, shift)
    assert abs(res["mean_diff"] - shift) < 0.01
    assert res["ci_low"] > 0 if shift > 0 else res["ci_high"] < 0  # the interval excludes 0
    assert res["p_wilcoxon"] < 0.001


def test_noise_only_interval_contains_zero():
    rng = np.random.default_rng(2)
    reference = rng.random(30)
    res = paired_comparison(reference + 0.05 * rng.standard_normal(30), reference)
    assert res["ci_low"] < 0 < res["ci_high"] and res["p_wilcoxon"] > 0.05


def test_nan_units_are_dropped_and_counted():
    a = np.array([0.5, np.nan, 0.7, 0.9, 0.4, 0.6])
    b = np.array([0.4, 0.3, np.nan, 0.8, 0.3, 0.5])
    res = paired_comparison(a, b)
    assert res["n"] == 4 and res["dropped_nan"] == 2 and res["mean_diff"] == pytest.approx(0.1)
    ci = bootstrap_mean_ci([np.nan, 0.2, 0.4])
    assert ci["n"] == 2 and ci["mean"] == pytest.approx(0.3) and 0.2 <= ci["ci_low"] <= ci["ci_high"] <= 0.4
    assert math.isnan(wilcoxon_p([np.nan]))


def test_mean_interval_covers_the_mean_and_narrows_with_more_units():
    rng = np.random.default_rng(3)
    small, large = bootstrap_mean_ci(rng.random(10)), bootstrap_mean_ci(rng.random(1000))
    for ci in (small, large):
        assert ci["ci_low"] < ci["mean"] < ci["ci_high"]
    assert large["ci_high"] - large["ci_low"] < (small["ci_high"] - small["ci_low"]) / 3


def rows_of(arm, protocol, dice):
    return [dict(arm=arm, protocol=protocol, budget="1-shot", n_train=1, draw=d, case="B", label=label, Dice=v)
            for (d, label), v in dice.items()]


def test_summary_and_pairing_by_case_label_draw():
    """Pairs are matched by (case, label, draw), whatever the row order; scratch and nnunet are references."""
    units = [(d, label) for d in range(3) for label in range(1, 7)]
    base = dict(zip(units, np.linspace(0.1, 0.9, len(units))))
    rows = rows_of("scratch", "full", base) + rows_of("hiend", "full", {k: v + 0.05 for k, v in base.items()})[::-1]
    rows += rows_of("nnunet", "full", {k: v + 0.1 for k, v in base.items()})
    summary = {r["arm"]: r for r in summarize(rows)}
    assert summary["hiend"]["mean"] == pytest.approx(np.mean(list(base.values())) + 0.05)
    assert summary["scratch"]["draws"] == 3 and summary["scratch"]["n"] == 18
    by_ref = {(c["arm"], c["reference"]): c for c in compare_all(rows)}
    assert by_ref[("hiend", "scratch (full)")]["mean_diff"] == pytest.approx(0.05)
    assert by_ref[("hiend", "scratch (full)")]["wins"] == 18
    assert by_ref[("hiend", "nnunet (full)")]["mean_diff"] == pytest.approx(-0.05)
    assert by_ref[("scratch", "nnunet (full)")]["ci_high"] < 0
    assert ("nnunet", "nnunet (full)") not in by_ref and ("scratch", "scratch (full)") not in by_ref


def test_primus_arms_pair_with_scratch_primus():
    """A pretrained Primus arm is compared with the same stock Primus network from scratch, not with the UNETR."""
    units = [(d, label) for d in range(2) for label in range(1, 7)]
    base = dict(zip(units, np.linspace(0.1, 0.9, len(units))))
    rows = rows_of("scratch", "full", base) + rows_of("hiend", "full", {k: v + 0.05 for k, v in base.items()})
    rows += rows_of("scratch_primus", "full", {k: v + 0.2 for k, v in base.items()})
    rows += rows_of("primus", "full", {k: v + 0.3 for k, v in base.items()})
    by_ref = {(c["arm"], c["reference"]): c for c in compare_all(rows, primus_arms={"primus"})}
    assert by_ref[("primus", "scratch_primus (full)")]["mean_diff"] == pytest.approx(0.1)
    assert by_ref[("hiend", "scratch (full)")]["mean_diff"] == pytest.approx(0.05)
    assert ("primus", "scratch (full)") not in by_ref and ("scratch_primus", "scratch (full)") not in by_ref


def test_cells_of_a_primus_arm_run_full_only_with_the_stock_trainer(tmp_path):
    import json
    from himae_nnunet.checkpoint.format import make_meta, save_checkpoint
    from himae_nnunet.evidence.cells import build_cells
    from himae_nnunet.evidence.prepare import Settings
    from himae_nnunet.models.hiend_mae import HiEndMAE
    from himae_nnunet.models.presets import model_config
    paths = {}
    for arm, preset in (("hiend", "vit_tiny_p8"), ("primus", "primus_s")):
        model = HiEndMAE(model_config(preset, crop_size=32))
        paths[arm] = str(tmp_path / f"{arm}.pt")
        save_checkpoint(paths[arm], model.state_dict(), make_meta(model.config))
    s = Settings(dataset="Dataset900_X", pretrained=paths, shots=[1], draws=2, nnunet=False)
    plans = tmp_path / "nnUNet_preprocessed" / "Dataset900_X" / "Compare_primus_full.json"
    plans.parent.mkdir(parents=True)
    plans.write_text(json.dumps({"himae": {"encoder": {"preset": "primus_s", "embed_dim": 396, "depth": 12}}}))
    folds = {"1-shot": [dict(fold=0, train=["a"]), dict(fold=1, train=["b"])]}
    cells = build_cells(s, folds, tmp_path)
    table = {(c.arm, c.protocol, c.draw): c for c in cells}
    assert {a for a, _, _ in table} == {"scratch", "hiend", "scratch_primus", "primus"}
    assert ("primus", "frozen", 0) not in table and ("hiend", "frozen", 0) in table
    primus, scratch = table[("primus", "full", 1)], table[("scratch_primus", "full", 1)]
    assert primus.trainer == scratch.trainer == "nnUNet_Primus_S_Trainer_HimaeBudget"
    assert primus.plans == scratch.plans == "Compare_primus_full" and primus.fold == 1
    assert primus.pretrained_weights.endswith("setup/Compare_primus_full.pth") and scratch.pretrained_weights is None
    assert table[("scratch", "frozen", 0)].plans == "Compare_hiend_frozen"
