"""Pretraining loader: random crops of nnU-Net-preprocessed CT, read through nnU-Net's dataset classes.

Every sample is a pure function of (seed, step, micro-batch, global volume index): which case, the crop
centres (3:1 tissue vs air), the augmentation and the token permutation. Hence the loader needs no state
to resume (it restarts at a step), any number of workers gives the same batches, and DDP ranks together
draw exactly the batch one process would draw with the same global batch.

Reading: an item opens the case's blosc2 array lazily and decompresses only the chunks under its crop
windows; crop centres come from a per-case index of tissue and air locations (`CropIndex`), built once from
the whole volume, stored beside nnU-Net's data folder (never inside it) and rebuilt when the array changes.
"""
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from himae_nnunet.core.atomic import replacing
from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import CONFIGURATION, dataset_id, dataset_name, require_folder
from himae_nnunet.pretrain.prepare import PLANS_BASE_NAME, PLANS_KEY


@dataclass
class Source:
    """One prepared dataset: its preprocessed folder, usable cases and sampling weight."""
    name: str
    folder: Path
    identifiers: list
    weight: float
    spacing: list
    window: list
    plans_name: str
    skipped: list = field(default_factory=list)


def find_plans(pre_folder: Path, plans_name: str | None) -> Path:
    """The pretraining plans of a dataset: `plans_name`, or the only/default one written by prepare-pretrain."""
    ds = pre_folder.name
    hint = f"run `himae-nnunet prepare-pretrain --dataset {dataset_id(ds)}` first"
    if plans_name:
        f = pre_folder / f"{plans_name}.json"
        if not f.is_file():
            raise UserError(f"{f} does not exist; {hint} (with the same --plans-name)")
        return f
    found = sorted(f for f in pre_folder.glob("*.json") if f.stem.startswith(PLANS_BASE_NAME)
                   and PLANS_KEY in json.loads(f.read_text()))
    if not found:
        raise UserError(f"{ds} has no pretraining plans in {pre_folder}; {hint}")
    default = [f for f in found if f.stem == PLANS_BASE_NAME]
    if default or len(found) == 1:
        return (default or found)[0]
    raise UserError(f"{ds} has several pretraining plans ({', '.join(f.stem for f in found)}); choose one "
                    f"with --plans-name")


def find_sources(datasets, weights=None, plans_name: str | None = None, skip_bad_cases: bool = False) -> list:
    """Resolve dataset ids to prepared Sources; every case is opened once so a bad file fails here, by name, and
    its crop index is built if missing or stale."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    if not datasets:
        raise UserError("give at least one --dataset")
    if weights is not None and (len(weights) != len(datasets) or min(weights) < 0 or sum(weights) <= 0):
        raise UserError(f"--weights {weights}: give one non-negative weight per --dataset ({len(datasets)})")
    pre_root = require_folder("nnUNet_preprocessed")
    sources = []
    for i, ds in enumerate(datasets):
        name = str(dataset_name(ds))
        plans_file = find_plans(pre_root / name, plans_name)
        plans = json.loads(plans_file.read_text())
        folder = pre_root / name / plans["configurations"][CONFIGURATION]["data_identifier"]
        if not folder.is_dir() or not any(folder.glob("*.pkl")):
            raise UserError(f"{folder} holds no preprocessed cases; run `himae-nnunet prepare-pretrain "
                            f"--dataset {dataset_id(name)}`")
        try:
            cls = infer_dataset_class(str(folder))
        except AssertionError:
            kinds = sorted({f.name.rsplit(".", 1)[-1] for f in folder.iterdir() if f.is_file()} - {"pkl", "npy"})
            raise UserError(f"{folder} holds files of several kinds ({', '.join('.' + k for k in kinds)}); nnU-Net "
                            f"expects only its .b2nd (or .npz) and .pkl files there: move the others out, or re-run "
                            f"prepare-pretrain --overwrite") from None
        ids, skipped = [], []
        nn_ds = cls(str(folder))
        # nnU-Net lists cases by their arrays: a case whose array file is gone would vanish silently
        for cid in sorted({p.stem for p in folder.glob("*.pkl")} - set(nn_ds.identifiers)):
            msg = f"{folder / cid}.*: the image array of this case is missing (only {cid}.pkl is there)"
            if not skip_bad_cases:
                raise UserError(f"{msg}; re-run prepare-pretrain --overwrite for {name}, or pass "
                                f"--skip-bad-cases to leave it out")
            skipped.append(msg)
        for cid in tqdm(nn_ds.identifiers, desc=f"{name}: cases and crop indices", unit="case", leave=False):
            try:
                data = nn_ds.load_case(cid)[0]
                if len(data.shape) != 4 or data.shape[0] != 1:
                    raise ValueError(f"shape {tuple(data.shape)}, expected one channel of a 3D volume")
                ensure_crop_index(folder, cid, lambda: data[0])
                ids.append(cid)
            except Exception as e:  # truncated/corrupted blosc2 or pickle files
                msg = f"{folder / cid}.*: cannot be read ({type(e).__name__}: {str(e)[:150]})"
                if not skip_bad_cases:
                    raise UserError(f"{msg}; re-run prepare-pretrain --overwrite for {name}, or pass "
                                    f"--skip-bad-cases to leave it out") from None
                skipped.append(msg)
        if not ids:
            raise UserError(f"{folder}: no readable case")
        meta = plans[PLANS_KEY]
        sources.append(Source(name, folder, ids, float(weights[i]) if weights else float(len(ids)),
                              meta["spacing"], meta["window"], plans_file.stem, skipped))
    for s in sources[1:]:
        if (s.spacing, s.window) != (sources[0].spacing, sources[0].window):
            raise UserError(f"{s.name} was prepared with spacing {s.spacing} / window {s.window} but "
                            f"{sources[0].name} with {sources[0].spacing} / {sources[0].window}; prepare all "
                            f"datasets with the same --spacing and --window")
    return sources


class UniformShiftTransform(ImageOnlyTransform):
    """Adds one offset drawn uniformly from [-max_shift, max_shift] (the paper's intensity shift)."""

    def __init__(self, max_shift: float):
        super().__init__()
        self.max_shift = max_shift

    def get_parameters(self, **data_dict) -> dict:
        return {"shift": float(torch.empty(1).uniform_(-self.max_shift, self.max_shift))}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return img.add_(params["shift"])


def paper_augmentation(crop_size) -> ComposeTransforms:
    """Flip p 0.5 per axis, rot90 in the axial plane p 0.3, intensity x(1 +- 0.1) p 0.1, +-0.1 p 0.1."""
    transforms = [MirrorTransform(allowed_axes=(0, 1, 2))]
    if crop_size[1] == crop_size[2]:  # axial plane (y, x) of the z, y, x arrays: square crops only
        transforms.append(RandomTransform(Rot90Transform(1, (1, 2, 3), allowed_axes={1, 2}), 0.3))
    transforms += [RandomTransform(MultiplicativeBrightnessTransform((0.9, 1.1), True), 0.1),
                   RandomTransform(UniformShiftTransform(0.1), 0.1)]
    return ComposeTransforms(transforms)


@contextmanager
def seeded_global_rngs(seed: int):
    """batchgeneratorsv2 draws from torch's and numpy's global generators: seed them, restore afterwards."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            yield
        finally:
            np.random.set_state(np_state)


TISSUE_THRESHOLD = 1e-2  # window units: above nnU-Net's cubic-resampling overshoot in air (~1e-8 .. 1e-2)
INDEX_SAMPLES = 10_000  # locations kept per class and case (nnU-Net keeps up to 10000 per class, too)
INDEX_VERSION = 1


def index_folder(data_folder: Path) -> Path:
    """Where the crop indices of an nnU-Net data folder live: beside it, in the dataset's preprocessed folder."""
    return Path(data_folder).parent / "himae_crop_index" / Path(data_folder).name


def _source_stamp(array_file: Path) -> list:
    st = os.stat(array_file)
    return [INDEX_VERSION, INDEX_SAMPLES, TISSUE_THRESHOLD, st.st_size, st.st_mtime_ns]


def _stamp_text(stamp: list) -> str:
    return json.dumps([repr(v) for v in stamp])


@dataclass
class CropIndex:
    """Tissue (> TISSUE_THRESHOLD) and air voxel locations of one case: a uniform random sample of each class
    (uint16 z, y, x rows), the class sizes and the volume shape. A draw from the sample is a uniform draw
    over the class."""
    shape: tuple
    tissue: np.ndarray  # (n, 3)
    air: np.ndarray  # (m, 3)
    n_tissue: int
    n_air: int

    @classmethod
    def build(cls, vol: np.ndarray) -> "CropIndex":
        """From the whole (z, y, x) volume; the sample is a fixed function of the volume (seed 0)."""
        if not np.isfinite(vol).all():
            raise ValueError("non-finite voxels")
        rng = np.random.default_rng(0)
        tissue = vol > TISSUE_THRESHOLD
        picks = []
        for mask in (tissue, ~tissue):
            flat = np.flatnonzero(mask)
            if flat.size > INDEX_SAMPLES:
                flat = np.sort(rng.choice(flat, INDEX_SAMPLES, replace=False))
            picks.append(np.stack(np.unravel_index(flat, vol.shape), axis=1).astype(np.uint16))
        n_tissue = int(tissue.sum())
        return cls(tuple(vol.shape), picks[0], picks[1], n_tissue, int(vol.size) - n_tissue)

    def save(self, path: Path, stamp: list) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, shape=np.array(self.shape), tissue=self.tissue, air=self.air,
                     counts=np.array([self.n_tissue, self.n_air]), stamp=np.array(_stamp_text(stamp)))

    @classmethod
    def load(cls, path: Path, stamp: list | None = None) -> "CropIndex | None":
        """The index at `path`; None when it is missing, unreadable or (given `stamp`) stale."""
        try:
            with np.load(path) as z:
                if stamp is not None and str(z["stamp"]) != _stamp_text(stamp):
                    return None
                return cls(tuple(int(v) for v in z["shape"]), z["tissue"], z["air"], *map(int, z["counts"]))
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def pick(self, rng: np.random.Generator, tissue: bool) -> np.ndarray:
        """A uniformly random tissue or air voxel (z, y, x); any voxel when the class is empty."""
        locations = self.tissue if tissue else self.air
        if len(locations) == 0:
            return rng.integers(0, self.shape)
        return locations[rng.integers(len(locations))].astype(np.int64)


def ensure_crop_index(data_folder: Path, cid: str, load_array) -> CropIndex:
    """The case's index, (re)built from the whole volume (`load_array()` -> (z, y, x)) when missing or stale."""
    path = index_folder(data_folder) / f"{cid}.npz"
    stamp = _source_stamp(Path(data_folder) / f"{cid}.b2nd")
    index = CropIndex.load(path, stamp)
    if index is None:
        index = CropIndex.build(np.asarray(load_array(), dtype=np.float32))
        try:
            index.save(path, stamp)
        except OSError as e:
            raise UserError(f"cannot write the crop index {path} ({e.strerror}); pretraining needs write access "
                            f"to {path.parent.parent}") from None
    return index


class CropDataset(torch.utils.data.Dataset):
    """Item key (step, micro, g) -> `crops_per_volume` augmented crops of one volume + token permutations."""

    def __init__(self, sources, crop_size, crops_per_volume: int, seed: int, patch_size: int,
                 augment: bool = True, tissue_fraction: float = 0.75, skip_bad_cases: bool = False):
        self.sources, self.crop = sources, tuple(int(c) for c in crop_size)
        self.n, self.seed, self.augment = crops_per_volume, int(seed), augment
        self.num_tokens = int(np.prod([c // patch_size for c in self.crop]))
        self.tissue_fraction, self.skip_bad_cases = tissue_fraction, skip_bad_cases
        w = np.array([s.weight for s in sources], float)
        self.p = w / w.sum()
        self._datasets = self._transform = None

    def _open(self, si: int):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        if self._datasets is None:
            self._datasets = [infer_dataset_class(str(s.folder))(str(s.folder), list(s.identifiers))
                              for s in self.sources]
        return self._datasets[si]

    def load_volume(self, si: int, cid: str) -> "CaseView":
        """The case's array, opened lazily (nothing decompressed yet), and its crop index."""
        folder = self.sources[si].folder
        data = self._open(si).load_case(cid)[0]
        index = ensure_crop_index(folder, cid, lambda: data[0])
        if tuple(data.shape[1:]) != index.shape:
            raise ValueError(f"array shape {tuple(data.shape[1:])} differs from its crop index {index.shape}")
        return CaseView(data, index, self.crop, self.n)

    def __getitem__(self, key):
        step, micro, g = key
        rng = np.random.default_rng([self.seed, step, micro, g])
        errors = []
        for _ in range(10):  # bad cases (when skipped) are replaced by another deterministic draw
            si = int(rng.choice(len(self.sources), p=self.p))
            cid = self.sources[si].identifiers[int(rng.integers(len(self.sources[si].identifiers)))]
            try:
                crops, centres = self.crops(self.load_volume(si, cid), rng)
                break
            except Exception as e:
                errors.append(f"{self.sources[si].folder / cid}.b2nd: {type(e).__name__}: {str(e)[:150]}")
                if not self.skip_bad_cases:
                    return {"error": f"cannot read {errors[-1]}; pass --skip-bad-cases to leave bad cases out"}
        else:
            return {"error": "10 bad cases in a row:\n" + "\n".join(errors)}
        np.clip(crops, 0.0, 1.0, out=crops)  # nnU-Net's cubic resampling overshoots the window slightly
        images = torch.from_numpy(crops)
        if self.augment:
            if self._transform is None:
                self._transform = paper_augmentation(self.crop)
            with seeded_global_rngs(int(rng.integers(2 ** 63))):
                images = torch.stack([self._transform(image=img)["image"] for img in images])
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 63)))
        perm = torch.rand(self.n, self.num_tokens, generator=gen).argsort(dim=1)
        return {"image": images.contiguous(), "perm": perm, "case": f"{self.sources[si].name}/{cid}",
                "centres": centres, "skipped": errors, "error": None}

    def crops(self, vol: "CaseView", rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(n, 1, *crop) crops of one case, each centred on a tissue voxel with probability tissue_fraction,
        else on an air voxel; and the (n, 3) centres (volume voxels)."""
        crops = np.empty((self.n, 1, *self.crop), np.float32)
        centres = np.empty((self.n, 3), np.int64)
        for i in range(self.n):
            centres[i] = vol.index.pick(rng, bool(rng.random() < self.tissue_fraction))
            vol.crop_at(centres[i], out=crops[i, 0])
        return crops, centres


WHOLE_READ_FACTOR = 0.3  # measured: one whole-volume decompression beats n crop-window reads below this


class CaseView:
    """One case for cropping: its (1, z, y, x) array and CropIndex. The blosc2 array stays lazy (each crop
    decompresses only the chunks under its window) unless the volume is small against the n crops it serves
    (under WHOLE_READ_FACTOR * n crops' voxels), where one whole read is cheaper. Volumes smaller than a crop
    are treated as centred in an air-padded (0) box of at least the crop size."""

    def __init__(self, data, index: CropIndex, crop, n_crops: int = 1):
        self.index, self.crop = index, np.array(crop)
        self.shape = np.array(index.shape)
        self.box = np.maximum(self.shape, self.crop)
        self.offset = (self.box - self.shape) // 2  # of the volume inside the padded box
        self.data, self.boxed = data, None  # boxed: the whole volume in its padded box, when read at once
        if np.prod(self.shape) <= WHOLE_READ_FACTOR * n_crops * np.prod(self.crop):
            whole = np.asarray(data[:], dtype=np.float32)  # (1, z, y, x)
            if not np.isfinite(whole).all():
                raise ValueError("non-finite voxels")
            self.data = whole
            self.boxed = np.pad(whole[0], [(o, b - s - o) for o, b, s in zip(self.offset, self.box, self.shape)])

    def crop_at(self, centre: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The crop around `centre` (volume voxel), shifted inside the padded box, written into `out` (new
        if None); a lazy array decompresses only the crop's window."""
        out = np.empty(tuple(self.crop), np.float32) if out is None else out
        lo = np.clip(centre + self.offset - self.crop // 2, 0, self.box - self.crop)  # box coordinates
        if self.boxed is not None:
            out[...] = self.boxed[tuple(slice(a, a + c) for a, c in zip(lo, self.crop))]
            return out
        lo = lo - self.offset  # volume coordinates
        src_lo, src_hi = np.maximum(lo, 0), np.minimum(lo + self.crop, self.shape)
        window = np.asarray(self.data[(0, *(slice(a, b) for a, b in zip(src_lo, src_hi)))], dtype=np.float32)
        if not np.isfinite(window).all():
            raise ValueError("non-finite voxels")
        if window.shape == tuple(self.crop):
            out[...] = window
        else:
            out[...] = 0
            out[tuple(slice(a, a + n) for a, n in zip(src_lo - lo, window.shape))] = window
        return out


def collate(items: list) -> dict:
    bad = [it["error"] for it in items if it["error"]]
    if bad:
        return {"error": bad[0]}
    return {"image": torch.cat([it["image"] for it in items]), "perm": torch.cat([it["perm"] for it in items]),
            "cases": [it["case"] for it in items], "skipped": [s for it in items for s in it["skipped"]],
            "error": None}


class StepBatches(torch.utils.data.Sampler):
    """Keys of the volumes this rank loads, per optimizer step and micro-batch, from `start_step` on."""

    def __init__(self, start_step: int, total_steps: int, accumulate: int, volumes: int, rank: int = 0,
                 fixed: bool = False):
        self.start, self.total, self.accumulate = start_step, total_steps, accumulate
        self.volumes, self.rank, self.fixed = volumes, rank, fixed

    def __len__(self):
        return max(0, self.total - self.start) * self.accumulate

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in range(self.accumulate):
                key_step = 0 if self.fixed else step  # fixed: the same batch every step (overfitting checks)
                yield [(key_step, micro, self.rank * self.volumes + j) for j in range(self.volumes)]


def _worker_init(_):
    import blosc2
    torch.set_num_threads(1)
    blosc2.set_nthreads(1)


def make_loader(dataset: CropDataset, sampler: StepBatches, workers: int, pin_memory: bool = False):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        worker_init_fn=_worker_init, persistent_workers=False, prefetch_factor=2 if workers else None)
