"""Scans in model space for the analyses: loading (an image file or an nnU-Net preprocessed dataset),
query voxels, and crops.

Model space = the checkpoint's spacing and intensity window: float32 (z, y, x) in [0, 1]. Scans given as
files are first reoriented to LPS, so that figures are in radiological orientation whatever the header says
(pretraining flips every axis at random, so orientation does not matter to the model); preprocessed nnU-Net
data are used as stored. Crops of smaller volumes are zero-padded (0 = air).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from himae_nnunet.core.errors import UserError
from himae_nnunet.scans.imageio import read_scan, to_model_input


@dataclass
class Volume:
    name: str
    array: np.ndarray  # float32 (z, y, x) in model space, values in [0, 1]
    spacing: tuple  # mm, same axis order as `array`
    labels: np.ndarray | None = None  # integer label map on the same grid, when one was given
    image: object = None  # the SimpleITK image it came from (None for preprocessed data)
    reference: object = None  # a SimpleITK image with the geometry of `array` (None for preprocessed data)


def load_image_volume(path, spacing, window, label_map=None) -> Volume:
    """A scan resampled to `spacing` and windowed; `label_map` (optional) is resampled onto the same grid
    by physical position (nearest neighbour), so label maps flipped relative to the image still align."""
    import SimpleITK as sitk
    image = sitk.DICOMOrient(read_scan(path), "LPS")
    array = to_model_input(image, spacing, window)
    reference = sitk.GetImageFromArray(np.zeros(array.shape, np.uint8))
    reference.SetSpacing([float(s) for s in spacing[::-1]])
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    labels = None
    if label_map is not None:
        lab = read_scan(label_map)
        labels = sitk.GetArrayFromImage(sitk.Resample(lab, reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                      0, sitk.sitkInt32))
    return Volume(Path(path).name, array, tuple(float(s) for s in spacing), labels, image, reference)


def load_dataset_volumes(dataset, spacing, data_identifier=None, max_cases=None) -> list[Volume]:
    """Cases of an nnU-Net preprocessed dataset (channel 0, with their segmentations when present).

    The data folder is `data_identifier`, else the only plans configuration whose spacing equals the
    checkpoint's (the pretraining data); the data must already be windowed to [0, 1] by that preprocessing."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from himae_nnunet.core.nnunet_env import dataset_name, require_folder
    root = require_folder("nnUNet_preprocessed") / dataset_name(dataset)
    folders = {}  # data identifier -> spacing (from every plans file's configurations)
    for plans in sorted(root.glob("*.json")):
        try:
            configs = json.loads(plans.read_text()).get("configurations", {})
        except (json.JSONDecodeError, AttributeError):
            continue
        for cfg in configs.values():
            if isinstance(cfg, dict) and "data_identifier" in cfg and (root / cfg["data_identifier"]).is_dir():
                folders[cfg["data_identifier"]] = tuple(cfg.get("spacing", ()))
    if data_identifier is None:
        match = [d for d, sp in folders.items() if len(sp) == 3 and np.allclose(sp, spacing, atol=1e-3)]
        if len(match) != 1:
            raise UserError(f"cannot choose the preprocessed data of {root.name}: "
                            f"{len(match) or 'no'} folder(s) at the checkpoint's spacing {list(spacing)} mm among "
                            f"{ {d: list(s) for d, s in folders.items()} or 'none'}; give --data-identifier")
        data_identifier = match[0]
    folder = root / data_identifier
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; preprocess the dataset first or fix --data-identifier")
    ds = infer_dataset_class(str(folder))(str(folder))
    if not ds.identifiers:
        raise UserError(f"{folder} holds no preprocessed cases")
    sp = folders.get(data_identifier, tuple(spacing))
    volumes = []
    for case in ds.identifiers[:max_cases]:
        data, seg, _, _ = ds.load_case(case)
        labels = np.asarray(seg[0]).astype(np.int32) if seg is not None else None
        volumes.append(Volume(case, np.asarray(data[0], dtype=np.float32), tuple(float(s) for s in sp), labels))
    lo, hi = min(v.array.min() for v in volumes), max(v.array.max() for v in volumes)
    if lo < -0.01 or hi > 1.01:
        raise UserError(f"{folder} holds values in [{lo:.2f}, {hi:.2f}], not the [0, 1] of pretraining "
                        f"preprocessing; give the --data-identifier of the pretraining plans")
    return volumes


def query_from_image_index(volume: Volume, index_xyz) -> tuple[int, int, int]:
    """A voxel index (x, y, z, 0-based, as SimpleITK/ITK-SNAP order it) of the original scan -> model (z, y, x)."""
    if volume.image is None:  # preprocessed data: the index is already in the array's own order
        return clamp_index(volume, tuple(int(i) for i in index_xyz))
    size = volume.image.GetSize()
    if any(not 0 <= int(i) < s for i, s in zip(index_xyz, size)):
        raise UserError(f"--query {list(index_xyz)} lies outside the scan of size {list(size)} (x, y, z)")
    point = volume.image.TransformIndexToPhysicalPoint([int(i) for i in index_xyz])
    idx = volume.reference.TransformPhysicalPointToContinuousIndex(point)
    return clamp_index(volume, tuple(int(round(i)) for i in idx[::-1]))


def query_from_label(volume: Volume, label: int) -> tuple[int, int, int]:
    """Centre of mass of `label` in model space, moved to the nearest voxel carrying that label."""
    if volume.labels is None:
        raise UserError("--query-label needs a label map: give --label-map (or a dataset with segmentations)")
    where = np.argwhere(volume.labels == label)
    if not len(where):
        present = sorted(int(v) for v in np.unique(volume.labels) if v > 0)
        raise UserError(f"label {label} does not occur in the label map of {volume.name}; present: {present}")
    centre = where.mean(0)
    return tuple(int(i) for i in where[np.argmin(((where - centre) ** 2).sum(1))])


def default_query(volume: Volume) -> tuple[int, int, int]:
    """The tissue voxel nearest the tissue's centre of mass (the body centre)."""
    tissue = np.argwhere(volume.array > 0)
    if not len(tissue):
        return tuple(s // 2 for s in volume.array.shape)
    centre = tissue.mean(0)
    return tuple(int(i) for i in tissue[np.argmin(((tissue - centre) ** 2).sum(1))])


def clamp_index(volume: Volume, idx) -> tuple[int, int, int]:
    return tuple(int(min(max(i, 0), s - 1)) for i, s in zip(idx, volume.array.shape))


def crop_around(array: np.ndarray, centre, size) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A `size` crop containing `centre`, as centred as the volume allows (zero padding where it is smaller).

    Returns (crop, start) with start the crop's origin in `array` coordinates (negative where padded)."""
    starts = []
    for c, s, n in zip(centre, size, array.shape):
        start = int(c) - s // 2
        start = min(max(start, 0), n - s) if n >= s else (n - s) // 2  # centred padding when too small
        starts.append(start)
    out = np.zeros(size, np.float32)
    src = tuple(slice(max(a, 0), min(a + s, n)) for a, s, n in zip(starts, size, array.shape))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, starts))
    out[dst] = array[src]
    return out, tuple(starts)


def inside_mask(shape, start, size) -> np.ndarray:
    """Boolean crop of `size` at `start`: True on voxels of the volume of `shape`, False on padding."""
    z, y, x = [(np.arange(n) + a >= 0) & (np.arange(n) + a < s) for n, a, s in zip(size, start, shape)]
    return z[:, None, None] & y[None, :, None] & x[None, None, :]


def sample_crops(volumes: list[Volume], n: int, size, seed: int) -> np.ndarray:
    """`n` crops [n, z, y, x], centres drawn uniformly among tissue voxels (> 0), volumes in turn."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        vol = volumes[i % len(volumes)].array
        tissue = np.flatnonzero(vol > 0)
        flat = rng.choice(tissue) if len(tissue) else rng.integers(vol.size)
        crops.append(crop_around(vol, np.unravel_index(flat, vol.shape), size)[0])
    return np.stack(crops)
