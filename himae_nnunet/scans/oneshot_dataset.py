"""The one-shot real-CT dataset of the paper's setting, as an nnU-Net raw dataset.

Patient A (ct_abdomen_ts_full, 3 mm NIfTI) trains, patient B (ct_abdomen_ts_dicom, a DICOM series whose
label NIfTI is y-flipped but in the same physical space) validates. Only the organs both label maps hold are
kept, remapped to 1..6. Used by the end-to-end test and examples/one_shot_real_ct.py.
"""
import json
from pathlib import Path

import numpy as np

# TotalSegmentator v2 `total` ids -> our labels
SHARED_ORGANS = {"spleen": 1, "liver": 5, "stomach": 6, "pancreas": 7, "aorta": 52, "inferior_vena_cava": 63}
CASE_A, CASE_B = "patientA", "patientB"


def remap_labels(arr: np.ndarray) -> np.ndarray:
    """TotalSegmentator ids -> 0 (background and every other organ) and 1..6 (SHARED_ORGANS order)."""
    out = np.zeros(arr.shape, np.uint8)
    for new, old in enumerate(SHARED_ORGANS.values(), start=1):
        out[arr == old] = new
    return out


def load_patient_a(data_dir: Path):
    import SimpleITK as sitk
    image = sitk.ReadImage(str(data_dir / "ct_abdomen_ts_full" / "example_ct.nii.gz"))
    label = sitk.ReadImage(str(data_dir / "ct_abdomen_ts_full" / "example_seg_fast_force_split.nii.gz"))
    return image, label


def load_patient_b(data_dir: Path):
    """B's DICOM series and its label resampled onto the series' grid by physical position (nearest)."""
    import SimpleITK as sitk
    from himae_nnunet.scans.imageio import read_scan
    image = read_scan(data_dir / "ct_abdomen_ts_dicom" / "dicom")
    label = sitk.ReadImage(str(data_dir / "ct_abdomen_ts_dicom" / "example_seg_dicom.nii.gz"))
    label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return image, label


def write_case(image, label, images_dir: Path, labels_dir: Path | None, case: str) -> None:
    import SimpleITK as sitk
    images_dir.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(images_dir / f"{case}_0000.nii.gz"))
    if labels_dir is not None:
        labels_dir.mkdir(parents=True, exist_ok=True)
        remapped = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(label)))
        remapped.CopyInformation(label)
        sitk.WriteImage(remapped, str(labels_dir / f"{case}.nii.gz"))


def write_ab_dataset(data_dir: str | Path, raw_root: str | Path, dataset_id: int = 501,
                     name: str = "OneShotAB") -> Path:
    """Write DatasetXXX_name (imagesTr/labelsTr: A and B; imagesTs/labelsTs: B) and return its folder."""
    data_dir = Path(data_dir)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    a_img, a_lab = load_patient_a(data_dir)
    b_img, b_lab = load_patient_b(data_dir)
    write_case(a_img, a_lab, folder / "imagesTr", folder / "labelsTr", CASE_A)
    write_case(b_img, b_lab, folder / "imagesTr", folder / "labelsTr", CASE_B)
    write_case(b_img, b_lab, folder / "imagesTs", folder / "labelsTs", CASE_B)
    labels = {"background": 0, **{organ: i for i, organ in enumerate(SHARED_ORGANS, start=1)}}
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz",
        "name": name, "description": "patient A (train) and B (validation), organs shared by both label maps",
    }, indent=2))
    return folder
