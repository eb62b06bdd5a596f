"""The real-CT comparison dataset: slabs of patient A train, patient B tests.

The shared data hold only two CTs whose label maps share organs: patient A (3 mm, chest to pelvis) and patient B
(a 4 cm abdominal DICOM series). Few-shot draws need several labelled training cases, so A's abdomen (the axial
range where any of the six shared organs is labelled) is cut into `slabs` contiguous, non-overlapping axial slabs,
each about as tall as B; each slab is one nnU-Net training case. B is the only test case (imagesTs/labelsTs).
Slabs of one patient are not independent patients: see docs/evidence.md for what that limits.
"""
import json
from pathlib import Path

import numpy as np

from himae_nnunet.core.errors import UserError
from himae_nnunet.scans.oneshot_dataset import CASE_B, SHARED_ORGANS, load_patient_a, load_patient_b, remap_labels, write_case


def organ_z_range(label_zyx: np.ndarray) -> tuple[int, int]:
    """First and one-past-last axial index (numpy z) holding any shared organ."""
    z = np.where(remap_labels(label_zyx).any(axis=(1, 2)))[0]
    return int(z.min()), int(z.max()) + 1


def slab_bounds(z0: int, z1: int, slabs: int) -> list[tuple[int, int]]:
    edges = np.linspace(z0, z1, slabs + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def write_slab_dataset(data_dir: str | Path, raw_root: str | Path, dataset_id: int = 520, name: str = "SlabsAB",
                       slabs: int = 4) -> Path:
    """Write DatasetXXX_name: imagesTr/labelsTr = `slabs` axial slabs of A's abdomen, imagesTs/labelsTs = B."""
    import SimpleITK as sitk
    if slabs < 2:
        raise UserError(f"--slabs {slabs}: at least 2 slabs are needed (one trains, one validates)")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists():
        raise UserError(f"{folder} exists; remove it or choose another --dataset-id")
    a_img, a_lab = load_patient_a(Path(data_dir))
    z0, z1 = organ_z_range(sitk.GetArrayFromImage(a_lab))
    if (z1 - z0) // slabs < 8:
        raise UserError(f"--slabs {slabs}: patient A's organ range has {z1 - z0} slices, too few for {slabs} slabs")
    tmp = folder.with_name(f".{folder.name}.partial")
    for k, (lo, hi) in enumerate(slab_bounds(z0, z1, slabs)):  # SimpleITK slicing is (x, y, z)
        write_case(a_img[:, :, lo:hi], a_lab[:, :, lo:hi], tmp / "imagesTr", tmp / "labelsTr", f"patientA_slab{k}")
    b_img, b_lab = load_patient_b(Path(data_dir))
    write_case(b_img, b_lab, tmp / "imagesTs", tmp / "labelsTs", CASE_B)
    labels = {"background": 0, **{organ: i for i, organ in enumerate(SHARED_ORGANS, start=1)}}
    (tmp / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": slabs, "file_ending": ".nii.gz",
        "name": name, "description": f"{slabs} axial slabs of patient A's abdomen (train, slices {z0}-{z1 - 1} "
                                     f"of ct_abdomen_ts_full) and patient B (test, ct_abdomen_ts_dicom); the "
                                     f"six organs both TotalSegmentator maps hold",
    }, indent=2))
    tmp.replace(folder)
    return folder
