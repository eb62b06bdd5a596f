"""Seeded synthetic abdominal CT in nnU-Net's raw format, for the demo and shape tests.

A body (skin, fat, muscle wall) with liver, spleen, kidneys and a vertebra at realistic Hounsfield units,
air outside and lung bases at the top, smoothed and noisy like a low-dose scan. Labels: 1 liver,
2 spleen, 3 kidneys.
"""
import json
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
HU = dict(air=-1000, lung=-850, fat=-100, muscle=45, liver=60, spleen=50, kidney=35, bone=700, skin=20)


def _ellipsoid(shape, centre, radii):
    """Boolean ellipsoid on a (z, y, x) grid; centre and radii in voxels."""
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2) <= 1.0


def synthetic_case(rng: np.random.Generator, shape=(64, 96, 96)) -> tuple[np.ndarray, np.ndarray]:
    """(CT in HU as int16, label map as uint8), both (z, y, x)."""
    from scipy.ndimage import gaussian_filter
    Z, Y, X = shape
    jitter = lambda s: rng.uniform(1 - s, 1 + s)  # noqa: E731
    ct = np.full(shape, HU["air"], np.float32)
    seg = np.zeros(shape, np.uint8)
    body_c = (Z / 2, Y / 2 + rng.uniform(-2, 2), X / 2 + rng.uniform(-2, 2))
    body_r = (Z, 0.40 * Y * jitter(0.06), 0.46 * X * jitter(0.06))  # a cylinder along z
    body = _ellipsoid(shape, body_c, body_r)
    ct[body] = HU["skin"]
    ct[_ellipsoid(shape, body_c, (Z, body_r[1] - 2, body_r[2] - 2))] = HU["fat"]
    wall = _ellipsoid(shape, body_c, (Z, body_r[1] - 5, body_r[2] - 5))
    ct[wall] = HU["muscle"]
    ct[_ellipsoid(shape, body_c, (Z, body_r[1] - 8, body_r[2] - 8))] = HU["fat"] + 60  # visceral fat + bowel
    # lung bases in the top slices, on both sides
    for side in (-1, 1):
        lung = _ellipsoid(shape, (Z * 1.05, Y * 0.45, X / 2 + side * X * 0.18), (Z * 0.3, Y * 0.2, X * 0.14))
        ct[lung & wall] = HU["lung"]
    organs = [  # label, HU, centre (fractions), radii (fractions)
        (1, HU["liver"], (0.62, 0.48, 0.34), (0.30, 0.22, 0.20)),
        (2, HU["spleen"], (0.66, 0.52, 0.74), (0.16, 0.10, 0.08)),
        (3, HU["kidney"], (0.38, 0.64, 0.33), (0.14, 0.07, 0.06)),
        (3, HU["kidney"], (0.36, 0.64, 0.67), (0.14, 0.07, 0.06)),
    ]
    for label, hu, c, r in organs:
        centre = [c[i] * shape[i] + rng.uniform(-2, 2) for i in range(3)]
        radii = [r[i] * shape[i] * jitter(0.12) for i in range(3)]
        mask = _ellipsoid(shape, centre, radii) & wall
        ct[mask] = hu + rng.normal(0, 4)
        seg[mask] = label
    spine = _ellipsoid(shape, (Z / 2, Y * 0.72, X / 2), (Z, Y * 0.07, X * 0.06))
    ct[spine] = HU["bone"]
    seg[spine] = 0
    ct = gaussian_filter(ct, 0.7) + rng.normal(0, 12, shape)
    return np.clip(ct, -1024, 3000).astype(np.int16), seg


def write_dataset(raw_dir: str | Path, dataset_id: int = 990, name: str = "HiEndDemo", num_cases: int = 6,
                  num_test: int = 0, seed: int = 0, shape=(64, 96, 96), spacing=(1.5, 1.5, 1.5)) -> Path:
    """Write DatasetXXX_NAME with imagesTr/labelsTr (+ imagesTs/labelsTs) and dataset.json; returns its folder."""
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    folder = Path(raw_dir) / f"Dataset{dataset_id:03d}_{name}"
    for i in range(num_cases + num_test):
        part = "Tr" if i < num_cases else "Ts"
        ct, seg = synthetic_case(rng, shape)
        for arr, path in ((ct, folder / f"images{part}" / f"case_{i:03d}_0000.nii.gz"),
                          (seg, folder / f"labels{part}" / f"case_{i:03d}.nii.gz")):
            path.parent.mkdir(parents=True, exist_ok=True)
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing([float(s) for s in spacing[::-1]])
            sitk.WriteImage(img, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": num_cases, "file_ending": ".nii.gz",
        "name": name, "description": f"synthetic abdominal CT made by himae_nnunet.demo.synthetic (seed {seed})",
    }, indent=2))
    return folder
