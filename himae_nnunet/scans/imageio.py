"""Reading scans (NIfTI, NRRD, MHA, DICOM series) with checks, and turning them into model input.

Arrays follow SimpleITK/nnU-Net order (z, y, x) with spacing given in the same order.
"""
from pathlib import Path

import numpy as np

from himae_nnunet.core.errors import UserError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def find_scans(folder: str | Path) -> list[Path]:
    """Image files and DICOM series folders (a folder holding .dcm or extensionless DICOM files) below `folder`."""
    import SimpleITK as sitk
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give the folder that holds the scans")
    scans = sorted(p for p in folder.rglob("*") if is_image_file(p))
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns for every folder without DICOM files
    try:
        for d in sorted({folder, *[p for p in folder.rglob("*") if p.is_dir()]}):
            if sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)):
                scans.append(d)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if not scans:
        raise UserError(f"no scans found in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series)")
    return scans


def read_scan(path: str | Path):
    """A 3D SimpleITK image from a file or a DICOM series folder; one clear message for each bad input."""
    import SimpleITK as sitk
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    try:
        if path.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise UserError(f"{path} is a folder without a DICOM series")
            if len(ids) > 1:
                raise UserError(f"{path} holds {len(ids)} DICOM series; put each series in its own folder")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
            if path.name.lower().endswith((".nii", ".nii.gz")):
                check_nifti_complete(path)  # ITK zero-fills truncated NIfTI data without an error
    except RuntimeError as e:
        raise UserError(f"cannot read {path}: the file is unreadable or truncated "
                        f"({str(e).strip().splitlines()[-1][:200]}); replace it or leave it out") from None
    check_image(image, path)
    return image


def check_nifti_complete(path: Path) -> None:
    """RuntimeError when a .nii/.nii.gz holds fewer data bytes than its header announces."""
    import gzip
    import struct
    import zlib
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            n = len(head)
            while chunk := f.read(1 << 22):
                n += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        raise RuntimeError(f"truncated or damaged compressed data ({e})") from None
    for end in "<>":
        if len(head) >= 348 and struct.unpack(end + "i", head[:4])[0] == 348:  # NIfTI-1
            dims, bitpix = struct.unpack(end + "8h", head[40:56]), struct.unpack(end + "h", head[72:74])[0]
            offset = int(struct.unpack(end + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(end + "i", head[:4])[0] == 540:  # NIfTI-2
            dims, bitpix = struct.unpack(end + "8q", head[16:80]), struct.unpack(end + "h", head[14:16])[0]
            offset = struct.unpack(end + "q", head[168:176])[0]
            break
    else:
        return
    expected = offset + int(np.prod([max(1, d) for d in dims[1:1 + max(1, dims[0])]])) * bitpix // 8
    if n < expected:
        raise RuntimeError(f"data ends after {n} of {expected} bytes")


def check_image(image, path) -> None:
    """Refuse what pretraining and nnU-Net cannot use: not 3D, multi-component, zero spacing, NaN voxels."""
    import SimpleITK as sitk
    if image.GetDimension() != 3:
        raise UserError(f"{path} is a {image.GetDimension()}D image; only 3D scans are supported "
                        f"(split 4D series into 3D volumes first)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                        f"give single-channel scans")
    if min(image.GetSize()) < 2:
        raise UserError(f"{path} has size {image.GetSize()}: a 2D slice, not a volume")
    if any(not np.isfinite(s) or s <= 0 for s in image.GetSpacing()):
        raise UserError(f"{path} has spacing {image.GetSpacing()}: zero, negative or missing; "
                        f"fix the header (voxel size in mm)")
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise UserError(f"{path} contains NaN or infinite voxels; fix or leave out this scan")


CT_AIR_MAX_HU = -500.0  # CT in HU holds air (about -1000 HU, or padding below it) far below this


def check_ct_hu(image, path, override: str = "--allow-non-ct") -> None:
    """Refuse a scan whose intensities are not CT in Hounsfield units (MR, already normalized data): even its
    lowest 0.1 % of voxels (robust to a few outliers) lie above CT_AIR_MAX_HU."""
    import SimpleITK as sitk
    arr = sitk.GetArrayViewFromImage(image)
    sample = arr.ravel()[::max(1, arr.size // 2_000_000)]  # a strided sample suffices for a percentile
    low = float(np.percentile(sample, 0.1))
    if low > CT_AIR_MAX_HU:
        raise UserError(f"{path} does not look like CT in Hounsfield units: its intensities range from "
                        f"{float(arr.min()):g} to {float(arr.max()):g} (lowest 0.1 %: {low:g}), with no air (CT air "
                        f"is about -1000 HU; here almost nothing is below {CT_AIR_MAX_HU:g}). An MR scan or already "
                        f"normalized data would be windowed as HU and come out mostly saturated; leave it out, or "
                        f"pass {override} if it really is CT in HU")


def to_model_input(image, spacing=(1.5, 1.5, 1.5), window=(-175.0, 250.0)) -> np.ndarray:
    """Resample to `spacing` (mm, z y x order) with linear interpolation, clip to `window`, scale to [0, 1].

    Returns float32 (z, y, x)."""
    import SimpleITK as sitk
    old_sp = np.array(image.GetSpacing()[::-1], float)
    size = np.array(image.GetSize()[::-1])
    new_size = np.maximum(1, np.round(size * old_sp / np.array(spacing, float))).astype(int)
    res = sitk.ResampleImageFilter()
    res.SetOutputSpacing([float(s) for s in spacing[::-1]])
    res.SetSize([int(s) for s in new_size[::-1]])
    res.SetOutputOrigin(image.GetOrigin())
    res.SetOutputDirection(image.GetDirection())
    res.SetInterpolator(sitk.sitkLinear)
    res.SetDefaultPixelValue(float(window[0]))
    arr = sitk.GetArrayFromImage(res.Execute(sitk.Cast(image, sitk.sitkFloat32))).astype(np.float32)
    lo, hi = window
    return (np.clip(arr, lo, hi) - lo) / (hi - lo)
