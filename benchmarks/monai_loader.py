"""The authors' pretraining loader rebuilt with MONAI (benchmark environment only, never a dependency).

LoadImage -> EnsureChannelFirst -> Orientation RAS -> Spacing 1.5 mm -> ScaleIntensityRange [-175, 250] ->
[0, 1] clipped -> CropForeground -> RandCropByPosNegLabel 96^3, pos 6, neg 2, 8 samples -> RandFlip x3 (p 0.5)
-> RandRotate90 (p 0.3) -> RandScaleIntensity 0.1 (p 0.1) -> RandShiftIntensity 0.1 (p 0.1).

Label choice: the windowed image itself is the label (`label_key="image"`), so "positive" centres are
tissue (> 0, i.e. HU > -175) and "negative" ones air (== 0), 3:1 as in our loader. We leave `image_key`
unset on purpose: with `image_key="image"` MONAI defines background as `label == 0 & image > 0`, which is
empty when label and image coincide, so every crop would silently become positive.
"""
INSTALL = "pip install -r benchmarks/requirements.txt  # monai, nibabel"


def missing() -> str | None:
    """None when MONAI can run here, else why not (with the install line)."""
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed: {INSTALL}"
    return None


def authors_transforms(crop: int = 96, samples: int = 8, spacing: float = 1.5, window=(-175.0, 250.0)):
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")  # Orientationd labels notice
    from monai import transforms as T
    keys = ["image"]
    return T.Compose([
        T.LoadImaged(keys, image_only=True),
        T.EnsureChannelFirstd(keys),
        T.Orientationd(keys, axcodes="RAS"),
        T.Spacingd(keys, pixdim=(spacing,) * 3, mode="bilinear"),
        T.ScaleIntensityRanged(keys, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        T.CropForegroundd(keys, source_key="image", allow_smaller=True),
        T.SpatialPadd(keys, spatial_size=(crop,) * 3),  # thin scans: the crop must fit
        T.RandCropByPosNegLabeld(keys, label_key="image", spatial_size=(crop,) * 3, pos=6, neg=2,
                                 num_samples=samples),
        T.RandFlipd(keys, prob=0.5, spatial_axis=0),
        T.RandFlipd(keys, prob=0.5, spatial_axis=1),
        T.RandFlipd(keys, prob=0.5, spatial_axis=2),
        T.RandRotate90d(keys, prob=0.3, max_k=3),
        T.RandScaleIntensityd(keys, factors=0.1, prob=0.1),
        T.RandShiftIntensityd(keys, offsets=0.1, prob=0.1),
        T.ToTensord(keys, track_meta=False),
    ])


def make_loader(files: list, workers: int, passes: int, seed: int = 0, crop: int = 96, samples: int = 8,
                cached: bool = False):
    """DataLoader over `passes` x `files` (one batch = one volume's `samples` crops), as the authors batch it.

    cached: CacheDataset keeps every volume after CropForeground in RAM (filled here, not timed), so only
    the random crops and augmentation run per batch; the authors' setting is the plain Dataset."""
    import torch
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.utils import set_determinism
    set_determinism(seed)
    data = [{"image": str(f)} for f in files]
    if cached:
        ds = CacheDataset(data, transform=authors_transforms(crop, samples), cache_rate=1.0, num_workers=1,
                          progress=False)
    else:
        ds = Dataset(data, transform=authors_transforms(crop, samples))
    ds = torch.utils.data.ConcatDataset([ds] * passes)
    return DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers, worker_init_fn=_one_thread,
                      prefetch_factor=2 if workers else None)


def _one_thread(_):
    import torch
    torch.set_num_threads(1)
