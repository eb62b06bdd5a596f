"""The pretraining loader on the prepared real CTs: 96^3 crops through nnU-Net's dataset classes, 3:1
tissue/air centres (checked against the HU of the original scans), padding, augmentation, determinism across
worker counts, restart at a step, the crop index."""
import os
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from himae_nnunet.core.errors import UserError
from himae_nnunet.pretrain import data as loader_data
from himae_nnunet.pretrain.data import (CropDataset, CropIndex, StepBatches, find_sources, index_folder, make_loader,
                                        paper_augmentation, seeded_global_rngs)
from test_pretrain_prepare import tree  # noqa: F401  (session-prepared nnU-Net tree)


def test_crops_are_a_pure_function_of_the_key_and_worker_count_does_not_matter(tree):
    sources = find_sources([501, 502], weights=[1, 1])
    assert [len(s.identifiers) for s in sources] == [3, 2] and sources[0].spacing == [1.5, 1.5, 1.5]
    ds = CropDataset(sources, (96, 96, 96), 8, seed=3, patch_size=16)
    a, b, c = ds[(5, 0, 1)], ds[(5, 0, 1)], ds[(6, 0, 1)]
    assert a["image"].shape == (8, 1, 96, 96, 96) and a["image"].dtype == torch.float32
    assert a["perm"].shape == (8, 216) and all(sorted(p.tolist()) == list(range(216)) for p in a["perm"])
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["perm"], b["perm"])
    assert not torch.equal(a["image"], c["image"])
    # two worker processes deliver exactly what the main process computes, in order
    batches0 = list(make_loader(ds, StepBatches(0, 2, 1, 2, rank=0), workers=0))
    batches2 = list(make_loader(ds, StepBatches(0, 2, 1, 2, rank=0), workers=2))
    assert len(batches2) == 2 and batches2[0]["image"].shape == (16, 1, 96, 96, 96)
    for x, y in zip(batches0, batches2):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["perm"], y["perm"]) and x["cases"] == y["cases"]
    # restarting at step 1 gives step 1's batch (what --resume relies on); rank 1 draws other volumes
    assert torch.equal(next(iter(make_loader(ds, StepBatches(1, 2, 1, 2), 0)))["image"], batches0[1]["image"])
    assert list(StepBatches(0, 1, 1, 2, rank=1)) == [[(0, 0, 2), (0, 0, 3)]]


def original_tissue(source, cid: str, shape) -> np.ndarray:
    """Per preprocessed voxel: is the original scan's voxel at that place above the window's lower bound (HU)?
    Maps back through nnU-Net's crop bbox and its resize coordinates ((i + 0.5) * old / new - 0.5)."""
    props = pickle.loads((source.folder / f"{cid}.pkl").read_bytes())
    raw = source.folder.parents[2] / "nnUNet_raw" / source.name / "imagesTr" / f"{cid}_0000.nii.gz"
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(raw)))
    before = props["shape_after_cropping_and_before_resampling"]
    idx = [np.clip(np.round((np.arange(n) + 0.5) * c / n - 0.5).astype(int), 0, c - 1) + lo
           for n, c, (lo, _) in zip(shape, before, props["bbox_used_for_cropping"])]
    return hu[np.ix_(*idx)] > source.window[0]


def tissue_share(vol: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Expected share of centres in true tissue when 3/4 of the centres are uniform over voxels > threshold."""
    cls = vol > threshold
    return 0.75 * truth[cls].mean() + 0.25 * truth[~cls].mean()


def test_crop_centres_land_in_true_tissue_three_times_in_four(tree):
    """Issue 12.1 on every real CT of the tree (3 mm, 1.5 mm, 0.98 mm and 0.57 mm in-plane, 5 mm slices): nnU-Net's
    cubic resampling leaves air slightly positive, so `> 0` calls much of the air tissue; TISSUE_THRESHOLD
    does not. What remains below 75 % on resampled scans is partial volume at air/tissue borders."""
    shares, old_shares = {}, {}
    for source in find_sources([501, 502]):
        ds = CropDataset([source], (96, 96, 96), 8, seed=0, patch_size=16, augment=False)
        for cid in source.identifiers:
            view = ds.load_volume(0, cid)
            vol = np.asarray(view.data[0])
            truth = original_tissue(source, cid, vol.shape)
            shares[cid] = tissue_share(vol, truth, loader_data.TISSUE_THRESHOLD)
            old_shares[cid] = tissue_share(vol, truth, 0.0)
            # the index the loader draws from is a uniform sample of the same classes
            index = view.index
            assert (vol[tuple(index.tissue.T)] > loader_data.TISSUE_THRESHOLD).all()
            assert (vol[tuple(index.air.T)] <= loader_data.TISSUE_THRESHOLD).all()
            sampled = 0.75 * truth[tuple(index.tissue.T)].mean() + 0.25 * truth[tuple(index.air.T)].mean()
            assert abs(sampled - shares[cid]) < 0.015, (cid, sampled, shares[cid])
    print("share of centres in true tissue, old `> 0` rule -> now:",
          {c: f"{old_shares[c]:.3f} -> {shares[c]:.3f}" for c in shares})
    assert np.mean(list(shares.values())) == pytest.approx(0.75, abs=0.03)
    assert min(shares.values()) > 0.70 and all(shares[c] >= old_shares[c] for c in shares)
    assert np.mean(list(old_shares.values())) < 0.72  # the old rule misses the paper's ratio


def test_tissue_air_ratio_padding_and_value_range(tree):
    sources = find_sources([501])
    ds = CropDataset(sources, (96, 96, 96), 8, seed=0, patch_size=16, augment=False)
    centres, cases = [], set()
    for step in range(12):
        item = ds[(step, 0, 0)]
        cid = item["case"].split("/")[1]
        cases.add(cid)
        view = ds.load_volume(0, cid)
        centres += [float(view.data[(0, *map(int, c))]) > loader_data.TISSUE_THRESHOLD for c in item["centres"]]
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert cases == {"abdomen_small", "lung", "patientB"}
    assert 0.6 <= np.mean(centres) <= 0.9, np.mean(centres)  # 3:1 tissue vs air, 96 crops
    # abdomen_small is 60 slices at 1.5 mm: its crops are padded with air to 96, centred
    view = ds.load_volume(0, "abdomen_small")
    crop = view.crop_at(np.array([30, 100, 120]))
    assert crop.shape == (96, 96, 96) and crop[:18].max() == 0 and crop[-18:].max() == 0 and crop[18:78].max() > 0
    assert np.array_equal(crop[18:78], np.asarray(view.data[0, :, 52:148, 72:168]))


def test_crop_index_picks_rare_classes_and_is_rebuilt_when_stale(tree, tmp_path):
    vol = np.zeros((40, 40, 40), np.float32)
    vol[3, 4, 5] = 0.7  # one tissue voxel
    vol[6, 7, 8] = loader_data.TISSUE_THRESHOLD / 2  # resampling overshoot in air: not tissue
    index = CropIndex.build(vol)
    rng = np.random.default_rng(0)
    assert index.n_tissue == 1 and index.pick(rng, tissue=True).tolist() == [3, 4, 5]
    assert len(index.air) == loader_data.INDEX_SAMPLES and index.n_air == 40 ** 3 - 1
    assert all(vol[tuple(index.pick(rng, tissue=False))] < loader_data.TISSUE_THRESHOLD for _ in range(50))
    assert CropIndex.build(np.zeros((4, 4, 4), np.float32)).pick(rng, tissue=True).shape == (3,)
    with pytest.raises(ValueError, match="non-finite"):
        CropIndex.build(np.full((4, 4, 4), np.nan, np.float32))
    # on disk: beside nnU-Net's data folder, never inside it; rebuilt when the array file changes
    source = find_sources([501])[0]
    folder = index_folder(source.folder)
    assert folder.parent.parent == source.folder.parent and sorted(p.stem for p in folder.glob("*.npz")) == \
        ["abdomen_small", "lung", "patientB"]
    assert {p.suffix for p in source.folder.iterdir()} == {".b2nd", ".pkl"}
    before = (folder / "lung.npz").stat().st_mtime_ns
    find_sources([501])
    assert (folder / "lung.npz").stat().st_mtime_ns == before  # fresh: kept
    array = source.folder / "lung.b2nd"
    os.utime(array, ns=(array.stat().st_atime_ns, array.stat().st_mtime_ns + 1))
    find_sources([501])
    assert (folder / "lung.npz").stat().st_mtime_ns != before  # stale: rebuilt


def test_augmentation_is_seeded_and_changes_crops():
    x = torch.rand(1, 32, 32, 32)
    t = paper_augmentation((32, 32, 32))
    outs = []
    for seed in (1, 1, 2, 3, 4):
        with seeded_global_rngs(seed):
            outs.append(t(image=x.clone())["image"])
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(o, x) for o in outs[2:])
    state = torch.get_rng_state()  # the global generators are restored
    with seeded_global_rngs(7):
        torch.rand(3)
    assert torch.equal(state, torch.get_rng_state())


def test_bad_sources(tree):
    with pytest.raises(UserError, match="one non-negative weight per --dataset"):
        find_sources([501, 502], weights=[1])
    with pytest.raises(UserError, match="does not exist"):
        find_sources([501], plans_name="nnUNetPlans_other")
