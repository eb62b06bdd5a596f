"""The pretraining loader on the prepared real CTs: 96^3 crops through nnU-Net's dataset classes, 3:1
tissue/air centres, padding, augmentation, determinism across worker counts, restart at a step."""
import numpy as np
import pytest
import torch

from himae_nnunet.core.errors import UserError
from himae_nnunet.pretrain.data import (CropDataset, StepBatches, find_sources, make_loader, paper_augmentation,
                                        pick_centre, seeded_global_rngs)
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


def test_tissue_air_ratio_padding_and_value_range(tree):
    sources = find_sources([501])
    ds = CropDataset(sources, (96, 96, 96), 8, seed=0, patch_size=16, augment=False)
    centres, cases = [], set()
    for step in range(12):
        item = ds[(step, 0, 0)]
        cases.add(item["case"].split("/")[1])
        centres += (item["image"][:, 0, 48, 48, 48] > 0).tolist()
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert cases == {"abdomen_small", "lung", "patientB"}
    assert 0.6 <= np.mean(centres) <= 0.9, np.mean(centres)  # 3:1 tissue vs air, 96 crops
    # abdomen_small is 60 slices at 1.5 mm: padded with air to 96
    vol = ds.load_volume(0, "abdomen_small")
    assert vol.shape[0] == 96 and vol[:18].max() == 0 and vol[-18:].max() == 0 and vol[18:78].max() > 0


def test_pick_centre_finds_rare_tissue_and_air():
    vol = np.zeros((40, 40, 40), np.float32)
    vol[3, 4, 5] = 0.7  # one tissue voxel: rejection sampling misses it, the fallback must find it
    rng = np.random.default_rng(0)
    assert pick_centre(vol, rng, tissue=True).tolist() == [3, 4, 5]
    assert vol[tuple(pick_centre(vol, rng, tissue=False))] == 0
    assert pick_centre(np.zeros((4, 4, 4), np.float32), rng, tissue=True).shape == (3,)


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
