"""Loader crops/s per worker: our pretraining loader (lazy crop reads, before/after) vs the authors' MONAI
pipeline, on the same real CTs.

Both run as one loader process would in a DataLoader worker: in-process (num_workers=0, so no prefetched
batches bias the clock), one torch thread, one blosc2 thread; 96^3 crops, 8 crops per loaded volume;
rounds alternate (ours, MONAI, ours, ...) so that background load on a shared machine hits both alike, and
the median round counts. Ours reads the nnU-Net-preprocessed volumes (1.5 mm, [0, 1]) written once by
`import-scans`; MONAI reads the NIfTI files of the same import (nnUNet_raw imagesTr) and resamples every time,
as the authors' loader does. The one-off preparation time is reported separately. A second MONAI figure
keeps every volume after CropForeground in RAM (CacheDataset, filling not timed): only the random part
(RandCropByPosNegLabel with its foreground/background search, flips, rotations, intensity) runs per batch.

Before / after (issue 15): "whole" is the loader as it was until the crop index, which decompressed and
checked the whole volume for every item (8 crops); "lazy" (the loader now) decompresses only the blosc2
chunks under the 8 crop windows and takes the centres from the per-case crop index. Both run on the largest
CTs alone (uncropped: the full abdominal CT and the NRRD chest CT, `--largest`) and on all of them.

    python benchmarks/loader_speed.py --data ../shared/data --rounds 3 --volumes 14
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path, data: Path) -> tuple[int, float]:
    """Import every CT of `data` into a fresh nnU-Net tree under `root` (sets nnUNet_* there). (id, seconds)"""
    from pretrain_speed import prepare_real_cts
    t0 = time.perf_counter()
    ds = prepare_real_cts(root, data)
    return ds, time.perf_counter() - t0


def raw_images(ds_id: int) -> list[Path]:
    from himae_nnunet.core.nnunet_env import dataset_name
    folder = Path(os.environ["nnUNet_raw"]) / str(dataset_name(ds_id)) / "imagesTr"
    return sorted(folder.glob("*_0000.nii.gz"))


@contextmanager
def one_thread():
    """What a loader worker gets (pretrain/data.py _worker_init); restored afterwards."""
    import blosc2
    old = torch.get_num_threads(), blosc2.nthreads
    torch.set_num_threads(1)
    blosc2.set_nthreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        blosc2.set_nthreads(old[1])


def timed(loader, batches: int) -> float:
    """crops per CPU second of this process over `batches` batches, after the first one (start-up, imports).
    The loaders run in-process with one thread, so CPU time is what one worker on its own core would take;
    unlike wall time it does not count the other jobs of a shared machine."""
    it = iter(loader)
    next(it)
    t0 = time.process_time()
    crops = 0
    for _ in range(batches):
        b = next(it)
        crops += b["image"].shape[0]
    dt = time.process_time() - t0
    del it
    return crops / dt


LARGEST = ("ct_abdomen_ts_full", "ct_lung_radiomics1")  # case-id prefixes: the biggest volumes at 1.5 mm


def whole_volume_dataset():
    """The loader as before the crop index: each item decompresses and checks the whole volume."""
    from himae_nnunet.pretrain.data import CaseView, CropDataset

    class WholeVolumeCrops(CropDataset):
        def load_volume(self, si, cid):
            lazy = super().load_volume(si, cid)
            return CaseView(lazy.data, lazy.index, self.crop, n_crops=10 ** 9)  # 10**9: always a whole read
    return WholeVolumeCrops


def ours_round(ds_id: int, volumes: int, seed: int, whole: bool = False, only=None) -> float:
    """crops/s of one in-process loader; `whole`: the old whole-volume read; `only`: case-id prefixes."""
    from dataclasses import replace

    from himae_nnunet.pretrain.data import CropDataset, StepBatches, find_sources, make_loader
    sources = find_sources([ds_id])
    if only:
        sources = [replace(s, identifiers=[c for c in s.identifiers if c.startswith(only)]) for s in sources]
    cls = whole_volume_dataset() if whole else CropDataset
    dataset = cls(sources, (96, 96, 96), 8, seed=seed, patch_size=16)
    return timed(make_loader(dataset, StepBatches(0, volumes + 1, 1, 1), workers=0), volumes)


def stack_largest(ds_id: int, times: int, new_id: int = 909) -> int:
    """A full-length CT stand-in: the preprocessed abdominal CT of `ds_id` repeated `times` along z (e.g. 2:
    448 slices at 1.5 mm), saved as nnU-Net does (its blosc2 chunking for the plans' patch) into a new dataset
    `new_id` of the current nnUNet_preprocessed. For temporary benchmark trees only."""
    import shutil

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params

    from himae_nnunet.pretrain.data import find_sources
    source = find_sources([ds_id])[0]
    cid = next(c for c in source.identifiers if c.startswith(LARGEST[0]))
    data, seg, _, props = nnUNetDatasetBlosc2(str(source.folder)).load_case(cid)
    data, seg = np.concatenate([data[:]] * times, axis=1), np.concatenate([seg[:]] * times, axis=1)
    pre = source.folder.parent
    new_pre = pre.parent / f"Dataset{new_id:03d}_StackedCT"
    (new_pre / source.folder.name).mkdir(parents=True, exist_ok=True)
    for f in (f"{source.plans_name}.json", "dataset.json"):
        shutil.copy(pre / f, new_pre / f)
    patch = json.loads((pre / f"{source.plans_name}.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
    blocks, chunks = comp_blosc2_params(data.shape, tuple(patch), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(patch), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, props, str(new_pre / source.folder.name / f"stacked{times}"),
                                  chunks=chunks, blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return new_id


def before_after(ds_id: int, rounds: int, volumes: int, stacked_id: int | None = None) -> dict:
    """Lazy vs whole-volume reads on the largest CTs, on all, and on the stacked stand-in; alternating round
    by round; medians."""
    from tqdm import tqdm
    sets = [("largest", ds_id, LARGEST), ("all", ds_id, None)] + ([("stacked", stacked_id, None)] if stacked_id else [])
    runs = {f"{name}_{mode}": [] for name, _, _ in sets for mode in ("whole", "lazy")}
    with one_thread():
        for r in tqdm(range(rounds), desc="before/after rounds", unit="round"):
            for name, ds, only in sets:
                for mode in ("whole", "lazy"):
                    runs[f"{name}_{mode}"].append(ours_round(ds, volumes, r, mode == "whole", only))
    out = {f"{k}_crops_per_s": statistics.median(v) for k, v in runs.items()}
    out.update({f"{k}_rounds": v for k, v in runs.items()}, largest_cases=list(LARGEST))
    for name, _, _ in sets:
        out[f"{name}_lazy_over_whole"] = out[f"{name}_lazy_crops_per_s"] / out[f"{name}_whole_crops_per_s"]
    return out


def monai_round(files: list, volumes: int, seed: int, cached: bool = False) -> float:
    import monai_loader
    passes = -(-(volumes + 1) // len(files))
    return timed(monai_loader.make_loader(files, workers=0, passes=passes, seed=seed, cached=cached), volumes)


def compare(ds_id: int, rounds: int, volumes: int, monai_volumes: int) -> dict:
    """Alternating rounds; medians of crops/s per worker; MONAI skipped (with the install line) if missing."""
    import monai_loader
    from tqdm import tqdm
    why_not = monai_loader.missing()
    files = raw_images(ds_id)
    ours, theirs, cached = [], [], []
    with one_thread():
        for r in tqdm(range(rounds), desc="loader rounds", unit="round"):
            ours.append(ours_round(ds_id, volumes, seed=r))
            if not why_not:
                theirs.append(monai_round(files, monai_volumes, seed=r))
                cached.append(monai_round(files, volumes, seed=r, cached=True))
    out = {"cases": len(files), "workers": 1, "crop": 96, "crops_per_volume": 8, "rounds": rounds,
           "ours_volumes_per_round": volumes, "ours_crops_per_s": statistics.median(ours), "ours_rounds": ours}
    if why_not:
        out.update(monai="skipped", monai_skipped_reason=why_not, loader_over_monai_crops_per_s=None)
    else:
        import monai
        out.update(monai_version=monai.__version__, monai_volumes_per_round=monai_volumes,
                   monai_crops_per_s=statistics.median(theirs), monai_rounds=theirs,
                   loader_over_monai_crops_per_s=statistics.median(ours) / statistics.median(theirs),
                   monai_cached_crops_per_s=statistics.median(cached), monai_cached_rounds=cached,
                   loader_over_monai_cached_crops_per_s=statistics.median(ours) / statistics.median(cached))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the real CTs (read-only)")
    ap.add_argument("--dataset", type=int, help="an already prepared dataset id (nnUNet_* set) instead of --data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--volumes", type=int, default=28, help="volumes timed per round, ours and MONAI cached")
    ap.add_argument("--monai-volumes", type=int, default=7, help="volumes timed per round, MONAI")
    ap.add_argument("--before-after-only", action="store_true", help="only lazy vs whole-volume reads, no MONAI")
    ap.add_argument("--stack", type=int, default=2, help="also time the abdominal CT stacked this often along z "
                                                         "(a full-length CT stand-in; 0: off; not with --dataset)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ds, prep_s = (args.dataset, None) if args.dataset else prepare(Path(tmp), Path(args.data))
        res = {} if args.before_after_only else compare(ds, args.rounds, args.volumes, args.monai_volumes)
        stacked = stack_largest(ds, args.stack) if args.stack and not args.dataset else None
        res["before_after"] = before_after(ds, args.rounds, args.volumes, stacked)
    res["prepare_s"] = prep_s
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
