"""`himae-nnunet split`: few-shot folds appended to splits_final.json, existing folds untouched."""
import json

import pytest

from himae_nnunet.cli import main
from himae_nnunet.core.errors import UserError
from himae_nnunet.vit_plans.splits import add_folds, few_shot_folds


def make_raw_dataset(raw, n_cases: int, name: str = "Dataset777_Split"):
    """A raw dataset whose files only need to exist (splitting reads names, not voxels)."""
    folder = raw / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i in range(n_cases):
        (folder / "imagesTr" / f"case{i:03d}_0000.nii.gz").write_bytes(b"")
        (folder / "labelsTr" / f"case{i:03d}.nii.gz").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                     "numTraining": n_cases, "file_ending": ".nii.gz"}))
    (nnunet_pre := raw.parent / "nnUNet_preprocessed" / name).mkdir(parents=True)
    return name, nnunet_pre / "splits_final.json"


def test_default_folds_first_then_one_shot(nnunet_dirs, capsys):
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    name, path = make_raw_dataset(nnunet_dirs["nnUNet_raw"], 20)
    assert main(["split", "777", "--shots", "1", "--seed", "3"]) == 0
    splits = json.loads(path.read_text())
    ids = [f"case{i:03d}" for i in range(20)]
    assert splits[:5] == [{"train": list(s["train"]), "val": list(s["val"])} for s in generate_crossval_split(ids)]
    assert len(splits) == 6 and len(splits[5]["train"]) == 1
    assert sorted(splits[5]["train"] + splits[5]["val"]) == ids  # validates on every other case
    assert "fold 5:" in capsys.readouterr().out
    # the same request again reuses fold 5 instead of duplicating it
    assert main(["split", "777", "--shots", "1", "--seed", "3"]) == 0
    assert len(json.loads(path.read_text())) == 6
    assert "fold 5 (already present)" in capsys.readouterr().out


def test_existing_folds_kept_percent_and_from_fold(nnunet_dirs):
    name, path = make_raw_dataset(nnunet_dirs["nnUNet_raw"], 20)
    custom = [{"train": [f"case{i:03d}" for i in range(10)], "val": [f"case{i:03d}" for i in range(10, 20)]}]
    path.write_text(json.dumps(custom))
    folds, note = add_folds(name, percent=10, seed=0, repeats=2, from_fold=0)
    splits = json.loads(path.read_text())
    assert note is None and splits[0] == custom[0]  # untouched, still first
    assert [i for i, _, new in folds] == [1, 2] and all(new for _, _, new in folds)
    for fold in splits[1:]:
        assert len(fold["train"]) == 1 and set(fold["train"]) <= set(custom[0]["train"])
        assert fold["val"] == custom[0]["val"]  # the source fold's validation cases
    assert splits[1]["train"] != splits[2]["train"]  # repeats are distinct draws


def test_explicit_cases_small_dataset(nnunet_dirs):
    name, path = make_raw_dataset(nnunet_dirs["nnUNet_raw"], 2)
    folds, note = add_folds(name, cases=["case000"])
    assert "too few" in note and folds[0][0] == 0
    assert json.loads(path.read_text()) == [{"train": ["case000"], "val": ["case001"]}]


@pytest.mark.parametrize("options,message", [
    (dict(cases=["nope"]), "not in the pool"),
    (dict(shots=5), "at least one must be left"),
    (dict(percent=150), "--percent"),
    (dict(shots=1, from_fold=3), "--from-fold 3"),
])
def test_bad_requests(options, message):
    ids = [f"c{i}" for i in range(5)]
    with pytest.raises(UserError, match=message):
        few_shot_folds(ids, [{"train": ids[:4], "val": ids[4:]}], **options)


def test_cli_error_is_clean(nnunet_dirs, capsys):
    make_raw_dataset(nnunet_dirs["nnUNet_raw"], 3)
    assert main(["split", "777", "--cases", "case999"]) == 2
    err = capsys.readouterr().err
    assert "case999" in err and "Traceback" not in err
