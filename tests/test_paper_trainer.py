"""The paper's fine-tuning protocol (trainers/paper.py): schedule in paper epochs, the authors' LR curve and loss,
the crop sampler on real preprocessed CT, and a stock nnUNetv2_train / nnUNetv2_predict run (smoke length) that
trains on patient A and predicts patient B. Reuses test_e2e_nnunet's `chain` (dataset, ViT plans and data)."""
import json
import math
import re

import numpy as np
import pytest
import torch

from himae_nnunet.cli import build_parser
from himae_nnunet.scans.oneshot_dataset import CASE_B
from himae_nnunet.trainers.paper_protocol import (PAPER_SCHEDULES, TISSUE_THRESHOLD, PaperCropLoader,
                                                  PaperDiceCELoss, PaperEpochLR, axial_axes,
                                                  paper_finetune_augmentation, paper_schedule)
from himae_nnunet.vit_plans.planning import derive_vit_plans
from nnunet_chain import PLANS, run
from test_e2e_nnunet import check_same_geometry
from test_plan import base_plans, tiny_checkpoint

SMOKE = "nnUNetTrainerHiEndMAE_paper_smoke"


@pytest.mark.parametrize("paper_epochs", [5000, 2000, 1000, 4, 4999])
@pytest.mark.parametrize("cases", [1, 7, 24, 300])
def test_schedule_is_paper_epochs_times_cases(paper_epochs, cases):
    epochs, per_epoch = paper_schedule(paper_epochs, cases)
    iterations = per_epoch * cases
    assert epochs * iterations == paper_epochs * cases  # exactly N x training cases iterations
    assert paper_epochs % per_epoch == 0 and (iterations <= 250 or per_epoch == 1)


def test_paper_settings_by_name_and_in_plans(tmp_path):
    parse = build_parser().parse_args
    assert {k: parse(["plan", "1", "--checkpoint", "c", "--paper-epochs", k]).paper_epochs
            for k in ("one-shot", "1%", "10%", "100%", "123")} == {**PAPER_SCHEDULES, "123": 123}
    with pytest.raises(SystemExit):
        parse(["plan", "1", "--checkpoint", "c", "--paper-epochs", "5 %"])
    ckpt, meta = tiny_checkpoint(tmp_path / "t.pt")
    plans = derive_vit_plans(base_plans(), str(ckpt), meta, "0" * 64, finetune=dict(paper_epochs=2000),
                             warn=lambda m: None)
    assert plans["himae"]["finetune"]["paper_epochs"] == 2000
    assert epochs_of(1, 2000) == (8, 250)


def test_paper_trainers_found_by_nnunet(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from himae_nnunet.trainers import paper
    from himae_nnunet.vit_plans.cli import ext_trainer_path
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_path())
    expected = {"": None, "_oneshot": 5000, "_1pct": 5000, "_10pct": 2000, "_100pct": 1000, "_smoke": 4}
    for base in ("nnUNetTrainerHiEndMAE_paper", "nnUNetTrainerUNETR_paper"):
        for suffix, epochs in expected.items():
            cls = recursive_find_trainer_class_by_name(base + suffix)
            assert cls is getattr(paper, base + suffix) and cls.PAPER_EPOCHS == epochs


def epochs_of(cases, paper_epochs):
    epochs, per_epoch = paper_schedule(paper_epochs, cases)
    return epochs, per_epoch * cases


def test_lr_is_the_authors_warmup_cosine():
    """LinearWarmupCosineAnnealingLR(warmup 50, max 150) as their closed form, stepped in paper epochs."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = PaperEpochLR(opt, 1e-4, paper_epochs=150, warmup_epochs=50, paper_epochs_per_epoch=10)
    lr = {}
    for e in (0, 1, 49, 50, 100, 149):
        sched.step_paper_epoch(e)
        lr[e] = opt.param_groups[0]["lr"]
    assert lr[0] == 0 and lr[1] == pytest.approx(1e-4 / 49) and lr[49] == pytest.approx(1e-4)
    assert lr[50] == pytest.approx(1e-4) and lr[100] == pytest.approx(0.5e-4)
    assert lr[149] == pytest.approx(0.5e-4 * (1 + math.cos(math.pi * 99 / 100)))
    sched.step(3)  # nnU-Net epoch 3 = paper epoch 30
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * 30 / 49)


def test_loss_is_monai_dice_ce_as_they_configure_it():
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    logits, target = torch.randn(4, 5, 12, 10, 8), torch.randint(0, 5, (4, 1, 12, 10, 8))
    target[1] = 0  # a crop without foreground
    ref = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    assert PaperDiceCELoss()(logits, target).item() == pytest.approx(ref(logits, target).item(), rel=1e-6)


def test_augmentation_rates_are_theirs():
    """Flip p 0.2 per axis, rot90 (k 1-3, axial plane) p 0.2, x(1 +- 0.1) p 0.1, +-0.1 p 0.1; labels follow."""
    assert axial_axes([0, 1, 2]) == (1, 2) and axial_axes([2, 0, 1]) == (0, 2)
    augment = paper_finetune_augmentation((4, 4, 4), (1, 2))
    torch.manual_seed(0)
    np.random.seed(0)
    slice_flips = swaps = scaled = shifted = 0
    n = 3000
    for _ in range(n):
        grid = torch.arange(64).reshape(1, 4, 4, 4)
        out = augment(image=grid.float(), segmentation=grid.to(torch.int16))
        image, seg = out["image"][0], out["segmentation"][0].float()
        slope = float(((image - image.mean()) * (seg - seg.mean())).sum() / ((seg - seg.mean()) ** 2).sum())
        offset = float((image - slope * seg).mean())
        assert torch.allclose(image, slope * seg + offset, atol=1e-4)  # labels moved with the image
        assert abs(slope - 1) <= 0.1 + 1e-6 and abs(offset) <= 0.1 + 1e-6
        scaled += abs(slope - 1) > 1e-4  # float32 round-off is ~1e-6
        shifted += abs(offset) > 1e-4
        slice_flips += int(seg[0, 0, 0]) // 16 == 3  # the slice axis only moves by its flip
        swaps += abs(int(seg[0, 1, 0]) - int(seg[0, 0, 0])) == 1  # odd k of rot90 swaps the in-plane axes
    sd = lambda p: 4 * math.sqrt(p * (1 - p) / n)  # noqa: E731
    for count, p in ((slice_flips, 0.2), (swaps, 0.2 * 2 / 3), (scaled, 0.1), (shifted, 0.1)):
        assert abs(count / n - p) < sd(p), (count / n, p)


def test_sampler_four_crops_of_one_volume_half_foreground(chain):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.loads((chain["pre"] / f"{PLANS}.json").read_text())
    folder = chain["pre"] / plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = ["patientA", CASE_B]
    dataset = infer_dataset_class(str(folder))(str(folder), cases)
    labels = PlansManager(str(chain["pre"] / f"{PLANS}.json")).get_label_manager(
        json.loads((chain["pre"] / "dataset.json").read_text()))
    patch = (32, 32, 32)
    np.random.seed(0)
    loader = PaperCropLoader(dataset, 4, patch, labels, transforms=None, tissue_channel=0)
    volumes = {c: [np.asarray(a) for a in dataset.load_case(c)[:2]] for c in cases}
    fg, seen = [], []
    for _ in range(50):
        batch = loader.generate_train_batch()
        assert batch["data"].shape == (4, 1, *patch) and batch["target"].shape == (4, 1, *patch)
        assert len(set(batch["keys"])) == 1  # one volume per iteration
        seen.append(batch["keys"][0])
        data, seg = volumes[batch["keys"][0]]
        for j, (centre, start) in enumerate(zip(batch["centres"], batch["starts"])):
            c = tuple(int(v) for v in centre)
            inside = tuple(int(v) for v in centre - start)
            assert all(0 <= i < p for i, p in zip(inside, patch))  # the centre lies in its crop
            assert batch["data"][j, 0][inside] == data[0][c] and batch["target"][j, 0][inside] == seg[0][c]
            fg.append(seg[0][c] > 0)
            if not fg[-1]:  # background centres lie inside the body
                assert seg[0][c] == 0 and data[0][c] > TISSUE_THRESHOLD
    assert all(sorted(seen[i:i + 2]) == sorted(cases) for i in range(0, 50, 2))  # each case once per pass
    share = np.mean(fg)  # 200 independent crops at p 1/2: 4 standard deviations are 0.14
    assert 0.36 < share < 0.64, share


def test_paper_trainer_trains_and_predicts_patient_b(chain):
    env, root = chain["env"], chain["root"]
    env_ext = env | {"nnUNet_extTrainer": run("himae-nnunet", "ext-trainer-path", env=env, stdout_only=True).strip()}
    run("nnUNetv2_train", 501, "3d_fullres", 0, "-tr", SMOKE, "-p", PLANS, "-device", "cpu", env=env_ext)
    fold = root / "nnUNet_results" / chain["raw"].name / f"{SMOKE}__{PLANS}__3d_fullres" / "fold_0"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "paper schedule: 4 paper epochs x 1 iterations (1 training cases" in log
    assert "run as 2 nnU-Net epochs of 2 paper epochs (2 iterations)" in log
    assert re.findall(r": Epoch (\d+)\s*\n", log) == ["0", "1"]  # 2 epochs x 2 iterations = 4 x 1 case
    assert "WARNING: patch [32, 32, 32] from the plans is not the paper's [96, 96, 96]" in log
    debug = json.loads((fold / "debug.json").read_text())
    assert (debug["batch_size"], debug["num_iterations_per_epoch"], debug["num_epochs"]) == ("4", "2", "2")
    assert debug["inference_allowed_mirroring_axes"] == "None"
    assert "encoder.blocks.11.attn.proj.weight" in json.loads((fold / "pretrained_weights.json").read_text())["loaded"]
    assert (fold / "validation" / f"{CASE_B}.nii.gz").is_file()

    pred = root / "pred_paper"
    run("nnUNetv2_predict", "-i", chain["raw"] / "imagesTs", "-o", pred, "-d", 501, "-c", "3d_fullres", "-f", 0,
        "-tr", SMOKE, "-p", PLANS, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", 1, "-nps", 1,
        env=env_ext)
    labels = check_same_geometry(pred / f"{CASE_B}.nii.gz", chain["raw"] / "imagesTs" / f"{CASE_B}_0000.nii.gz")
    assert labels.size > 0
