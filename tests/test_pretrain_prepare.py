"""Pretraining data preparation on the real CTs: import-scans (NIfTI, NRRD, DICOM), prepare-pretrain of a
labelled nnU-Net dataset, and the bad inputs. The prepared tree is built once per session (`prepared_tree`)
and shared with test_pretrain_loader.py / test_pretrain_loop.py."""
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from himae_nnunet.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_TREE = {}


@contextmanager
def nnunet_env(root: Path):
    old = {v: os.environ.get(v) for v in (*VARS, "nnUNet_compile")}
    os.environ.update({v: str(root / v) for v in VARS}, nnUNet_compile="f")
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def write_labelled_dataset(raw: Path) -> None:
    """Dataset502_Labelled: two real CTs with their (binary) label maps, nnU-Net raw layout."""
    ds = raw / "Dataset502_Labelled"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for case, img, seg in (("spleen", "ct_spleen_msd/sub-spleen2_ct.nii.gz",
                            "ct_spleen_msd/sub-spleen2_ct_seg-manual.nii.gz"),
                           ("pulmonary", "ct_pulmonary/ct_cropped.nii.gz", "ct_pulmonary/pulmonary_artery.nii.gz")):
        shutil.copy(DATA / img, ds / "imagesTr" / f"{case}_0000.nii.gz")
        label = sitk.ReadImage(str(DATA / seg))
        sitk.WriteImage(sitk.Cast(label > 0, sitk.sitkUInt8), str(ds / "labelsTr" / f"{case}.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                 "structure": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))


def scans_folder(root: Path) -> Path:
    """Only images (no label files): a NIfTI, an NRRD and a DICOM series folder."""
    scans = root / "scans"
    (scans / "patientB").mkdir(parents=True)
    os.symlink(DATA / "ct_abdomen_ts_small" / "example_ct_sm.nii.gz", scans / "abdomen_small.nii.gz")
    os.symlink(DATA / "ct_lung_radiomics1" / "lung1_image.nrrd", scans / "lung.nrrd")
    for f in (DATA / "ct_abdomen_ts_dicom" / "dicom").iterdir():
        os.symlink(f, scans / "patientB" / f.name)
    return scans


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepared_tree(tmp_path_factory) -> dict:
    """Session-wide nnU-Net tree: 501 = imported unlabelled scans, 502 = a labelled dataset; both prepared."""
    if not _TREE:
        if not DATA.exists():
            pytest.skip(f"{DATA} is absent")
        root = tmp_path_factory.mktemp("pretrain_tree")
        for v in VARS:
            (root / v).mkdir()
        with nnunet_env(root):
            write_labelled_dataset(root / "nnUNet_raw")
            # a stand-in for the user's baseline preprocessed data, which must survive untouched
            baseline = root / "nnUNet_preprocessed" / "Dataset502_Labelled" / "nnUNetPlans_3d_fullres"
            baseline.mkdir(parents=True)
            (baseline / "case.b2nd").write_bytes(b"baseline")
            assert main(["import-scans", "--input", str(scans_folder(root)), "--dataset-id", "501",
                         "--name", "Unlabelled"]) == 0
            assert main(["prepare-pretrain", "--dataset", "502"]) == 0
        _TREE.update(root=root, baseline=baseline, base_plans_sha=sha(
            root / "nnUNet_preprocessed" / "Dataset502_Labelled" / "nnUNetPlans.json"))
    return _TREE


@pytest.fixture
def tree(tmp_path_factory, monkeypatch):
    t = prepared_tree(tmp_path_factory)
    for v in VARS:
        monkeypatch.setenv(v, str(t["root"] / v))
    monkeypatch.setenv("nnUNet_compile", "f")
    return t


def load_pre(folder: Path, case: str):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    data, seg, _, props = infer_dataset_class(str(folder))(str(folder)).load_case(case)
    return np.asarray(data), np.asarray(seg), props


def test_import_scans_reads_nifti_nrrd_dicom_and_preprocesses_at_15mm(tree):
    raw = tree["root"] / "nnUNet_raw" / "Dataset501_Unlabelled"
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"} and ds["himae_unlabelled"] and ds["numTraining"] == 3
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [
        "abdomen_small_0000.nii.gz", "lung_0000.nii.gz", "patientB_0000.nii.gz"]
    pre = tree["root"] / "nnUNet_preprocessed" / "Dataset501_Unlabelled"
    plans = json.loads((pre / "nnUNetPlans_himaePretrain.json").read_text())
    folder = pre / plans["configurations"]["3d_fullres"]["data_identifier"]
    # extent / 1.5 mm: small 30 x 3 mm -> 60; lung 48 x 5 mm -> 160; DICOM 20 x 2 mm -> ~27, 512 x 0.977 -> ~333
    expected = {"abdomen_small": (60, 202, 244), "lung": (160, 195, 195), "patientB": (27, 333, 333)}
    for case, shape in expected.items():
        data, seg, props = load_pre(folder, case)
        assert data.dtype == np.float32 and data.shape[0] == 1
        assert np.allclose(data.shape[1:], shape, atol=2), (case, data.shape)
        assert data.min() >= -0.05 and data.max() <= 1.05 and 0.2 < (data > 0.01).mean() < 0.95
        assert seg.max() == 1  # the body mask import-scans writes as labelsTr
    # the DICOM series was read with its geometry: body mask and image agree
    img = sitk.ReadImage(str(raw / "imagesTr" / "patientB_0000.nii.gz"))
    assert img.GetSize() == (512, 512, 20) and abs(img.GetSpacing()[2] - 2.0) < 1e-3


def test_prepare_pretrain_writes_own_plans_and_keeps_baseline(tree):
    pre = tree["root"] / "nnUNet_preprocessed" / "Dataset502_Labelled"
    plans = json.loads((pre / "nnUNetPlans_himaePretrain.json").read_text())
    base = json.loads((pre / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert plans["plans_name"] == "nnUNetPlans_himaePretrain" and list(plans["configurations"]) == ["3d_fullres"]
    assert cfg["spacing"] == [1.5, 1.5, 1.5] and cfg["normalization_schemes"] == ["CTNormalization"]
    assert cfg["data_identifier"] != base["configurations"]["3d_fullres"]["data_identifier"]
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"]) == (-175, 250, -175, 425)
    # stock nnU-Net reads the plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    assert PlansManager(plans).get_configuration("3d_fullres").data_identifier == cfg["data_identifier"]
    data, _, props = load_pre(pre / cfg["data_identifier"], "spleen")
    assert np.allclose(data.shape[1:], (87, 88, 87), atol=2)  # 26 x 5 mm, 164/166 x 0.795 mm at 1.5 mm
    # a second run finds the data prepared and leaves everything alone
    before = sha(pre / "nnUNetPlans_himaePretrain.json")
    assert main(["prepare-pretrain", "--dataset", "Dataset502_Labelled"]) == 0
    assert sha(pre / "nnUNetPlans_himaePretrain.json") == before
    assert sha(pre / "nnUNetPlans.json") == tree["base_plans_sha"]
    assert (tree["baseline"] / "case.b2nd").read_bytes() == b"baseline"
    assert sorted(p.name for p in tree["baseline"].iterdir()) == ["case.b2nd"]


def test_prepare_refuses_other_settings_under_the_same_plans_name(tree, capsys):
    assert main(["prepare-pretrain", "--dataset", "502", "--spacing", "2", "2", "2",
                 "--plans-name", "nnUNetPlans_himaePretrain"]) == 2
    assert "exists with other settings" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input: one message, nothing written

def bad_image(kind: str, folder: Path) -> Path:
    arr = np.zeros((8, 8, 8), np.int16)
    if kind == "truncated":
        path = folder / "cut.nii.gz"
        path.write_bytes((DATA / "ct_abdomen_ts_small" / "example_ct_sm.nii.gz").read_bytes()[:4000])
    elif kind == "2d":
        path = folder / "slice.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(arr[0]), str(path))
    elif kind == "4d":
        path = folder / "series4d.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8, 8), np.int16)), str(path))
    elif kind == "nan":
        path = folder / "nan.nrrd"  # ITK reads NaN in NIfTI as 0; NRRD keeps it
        a = arr.astype(np.float32)
        a[2, 3, 4] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    else:  # zero spacing in a hand-written MetaImage header
        path = folder / "zero_spacing.mha"
        header = ("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
                  "ElementSpacing = 1 0 1\nElementDataFile = LOCAL\n")
        path.write_bytes(header.encode() + arr.tobytes())
    return path


@pytest.mark.parametrize("kind", ["truncated", "2d", "4d", "nan", "zero_spacing"])
def test_import_scans_bad_file_named_and_nothing_written(kind, nnunet_dirs, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(DATA / "ct_abdomen_ts_small" / "example_ct_sm.nii.gz", folder / "good.nii.gz")
    bad = bad_image(kind, folder)
    assert main(["import-scans", "-i", str(folder), "--dataset-id", "601", "--name", "Bad"]) == 2
    err = capsys.readouterr().err
    assert bad.name in err and "--skip-bad-cases" in err and "Traceback" not in err
    assert list(nnunet_dirs["nnUNet_raw"].iterdir()) == []
    assert list(nnunet_dirs["nnUNet_preprocessed"].iterdir()) == []


def test_import_scans_skip_bad_cases_imports_the_rest(nnunet_dirs, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(DATA / "ct_abdomen_ts_small" / "example_ct_sm.nii.gz", folder / "good.nii.gz")
    bad_image("nan", folder)
    assert main(["import-scans", "-i", str(folder), "--dataset-id", "602", "--name", "Some",
                 "--skip-bad-cases", "--no-prepare"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "nan.nrrd" in out
    images = nnunet_dirs["nnUNet_raw"] / "Dataset602_Some" / "imagesTr"
    assert [p.name for p in images.iterdir()] == ["good_0000.nii.gz"]
    # the id is now taken
    assert main(["import-scans", "-i", str(folder), "--dataset-id", "602", "--name", "Again"]) == 2
    assert "is taken" in capsys.readouterr().err


def test_empty_folder_unknown_dataset_and_missing_env(nnunet_dirs, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["import-scans", "-i", str(tmp_path / "empty"), "--dataset-id", "603", "--name", "E"]) == 2
    assert "no scans found" in capsys.readouterr().err
    assert main(["prepare-pretrain", "--dataset", "999"]) == 2
    assert "'999' was not found" in capsys.readouterr().err
    assert main(["pretrain", "--dataset", "999", "--output", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "'999' was not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("nnUNet_preprocessed")
    assert main(["prepare-pretrain", "--dataset", "1"]) == 2
    assert "nnUNet_preprocessed is not set" in capsys.readouterr().err


def test_pretrain_on_unprepared_dataset_says_what_to_run(nnunet_dirs, tmp_path, capsys):
    ds = nnunet_dirs["nnUNet_preprocessed"] / "Dataset604_Plain"
    ds.mkdir()
    (ds / "nnUNetPlans.json").write_text("{}")
    assert main(["pretrain", "--dataset", "604", "--output", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "prepare-pretrain --dataset 604" in capsys.readouterr().err


# ---------------------------------------------------------------- thick slices and non-CT input

def test_thick_slice_ct_is_interpolated_along_the_slice_axis(nnunet_dirs, tmp_path):
    """Issue 12.2: a real CT resampled to 5 mm slices (1.5 mm in-plane: ratio 3.3, so nnU-Net resamples the
    slice axis separately) comes out of preprocessing at 1.5 mm with every slice interpolated between its two
    neighbouring 5 mm slices, not copied (nnU-Net's default order_z 0 makes 70 % of the slices copies)."""
    from himae_nnunet.checkpoint.format import make_meta
    from himae_nnunet.models import model_config
    from himae_nnunet.vit_plans.planning import derive_vit_plans
    ct = sitk.ReadImage(str(DATA / "ct_pulmonary" / "ct_cropped.nii.gz"))  # 1.5 mm isotropic
    size = [ct.GetSize()[0], ct.GetSize()[1], round(ct.GetSize()[2] * ct.GetSpacing()[2] / 5.0)]
    thick = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), (1.5, 1.5, 5.0),
                          ct.GetDirection(), -1024.0, ct.GetPixelID())
    (tmp_path / "in").mkdir()
    sitk.WriteImage(thick, str(tmp_path / "in" / "thick.nii.gz"))
    assert main(["import-scans", "-i", str(tmp_path / "in"), "--dataset-id", "611", "--name", "Thick"]) == 0
    pre = nnunet_dirs["nnUNet_preprocessed"] / "Dataset611_Thick"
    plans = json.loads((pre / "nnUNetPlans_himaePretrain.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["resampling_fn_data_kwargs"]["order_z"] == 1 and cfg["resampling_fn_seg_kwargs"]["order_z"] == 1
    assert cfg["data_identifier"].endswith("_zlin")
    data, _, props = load_pre(pre / cfg["data_identifier"], "thick")
    vol = data[0]  # (z, y, x) at 1.5 mm
    (z0, z1), (y0, y1), (x0, x1) = props["bbox_used_for_cropping"]
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet_dirs["nnUNet_raw"] / "Dataset611_Thick" / "imagesTr" /
                                                   "thick_0000.nii.gz"))).astype(np.float32)[z0:z1, y0:y1, x0:x1]
    src = np.clip((src + 175) / 425, 0, 1)  # the window, as nnU-Net applies it before resampling
    assert vol.shape[1:] == src.shape[1:] and vol.shape[0] == pytest.approx(src.shape[0] * 5 / 1.5, abs=1)
    pos = (np.arange(vol.shape[0]) + 0.5) * src.shape[0] / vol.shape[0] - 0.5  # nnU-Net's slice coordinates
    inner = np.flatnonzero((pos >= 0) & (pos <= src.shape[0] - 1))  # outside: clamped to the end slices
    assert len(inner) >= vol.shape[0] - 4
    assert not any(np.array_equal(vol[k], vol[k + 1]) for k in inner[:-1])
    for k in inner:
        below, above = src[int(np.floor(pos[k]))], src[int(np.ceil(pos[k]))]
        assert (vol[k] >= np.minimum(below, above) - 1e-3).all() and (vol[k] <= np.maximum(below, above) + 1e-3).all()
    # the ViT plans follow the same rule
    base = json.loads((pre / "nnUNetPlans.json").read_text())
    meta = make_meta(model_config("vit_tiny"), spacing=(1.5, 1.5, 1.5))
    vit = derive_vit_plans(base, "ck.pt", meta, "abc", "P", warn=lambda *_: None)["configurations"]["3d_fullres"]
    assert vit["resampling_fn_data_kwargs"] == cfg["resampling_fn_data_kwargs"]
    assert vit["data_identifier"] == "P_3d_fullres_zlin"


def test_scans_that_are_not_ct_in_hu_are_refused(nnunet_dirs, tmp_path, capsys):
    """Issue 13.12: an MR volume (intensities -47 .. 833, no air) is refused by import-scans and by
    prepare-pretrain, naming the file and its range; --allow-non-ct lets it through."""
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(DATA / "mr_abdomen_ts_small" / "example_mr_sm.nii.gz", folder / "mr.nii.gz")
    os.symlink(DATA / "ct_abdomen_ts_small" / "example_ct_sm.nii.gz", folder / "ct.nii.gz")
    assert main(["import-scans", "-i", str(folder), "--dataset-id", "612", "--name", "MR"]) == 2
    err = capsys.readouterr().err
    assert "mr.nii.gz does not look like CT in Hounsfield units" in err and "from -47 to 833" in err
    assert "--allow-non-ct" in err and "Traceback" not in err and list(nnunet_dirs["nnUNet_raw"].iterdir()) == []
    assert main(["import-scans", "-i", str(folder), "--dataset-id", "612", "--name", "MR", "--skip-bad-cases",
                 "--no-prepare"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert [p.name for p in (nnunet_dirs["nnUNet_raw"] / "Dataset612_MR" / "imagesTr").iterdir()] == ["ct_0000.nii.gz"]
    assert main(["import-scans", "-i", str(folder), "--dataset-id", "613", "--name", "MRToo", "--allow-non-ct",
                 "--no-prepare"]) == 0
    assert len(list((nnunet_dirs["nnUNet_raw"] / "Dataset613_MRToo" / "imagesTr").iterdir())) == 2
    assert main(["prepare-pretrain", "--dataset", "613"]) == 2
    err = capsys.readouterr().err
    assert "mr_0000.nii.gz does not look like CT" in err and "from -47 to 833" in err and "--allow-non-ct" in err
    assert not (nnunet_dirs["nnUNet_preprocessed"] / "Dataset613_MRToo").exists()
