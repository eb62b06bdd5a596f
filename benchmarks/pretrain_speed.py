"""Pretraining speed on the real CTs, in one run on one machine:

1. loader throughput (crops/s, 1 worker process) on nnU-Net-preprocessed CT: 96^3 crops, 8 per volume,
   3:1 tissue/air centres, the paper's augmentation, through nnU-Net's dataset classes;
2. pretraining step time (forward + backward + AdamW) of Hi-End-MAE (B = 3) and MAE (B = 0) with the same
   encoder and batch, on real crops from that loader, and their ratio.

Without --dataset it imports every CT of ../shared/data into a temporary nnU-Net tree and prepares it
(import-scans + prepare-pretrain: about a minute on 2 CPU cores).

    python benchmarks/pretrain_speed.py --device cpu --model vit_small --volumes 1 --steps 5
    python benchmarks/pretrain_speed.py --device cuda --model vit_b12_1536 --volumes 4 --steps 20
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from timing import median_times_in_turns

REPO = Path(__file__).resolve().parents[1]
CTS = ["ct_abdomen_ts_full/example_ct.nii.gz", "ct_abdomen_ts_small/example_ct_sm.nii.gz", "ct_abdomen_ts_dicom/dicom",
       "ct_spleen_msd/sub-spleen2_ct.nii.gz", "ct_aorta_cta/ct_cropped.nii.gz", "ct_pulmonary/ct_cropped.nii.gz",
       "ct_lung_radiomics1/lung1_image.nrrd"]


def prepare_real_cts(root: Path, data: Path) -> int:
    from himae_nnunet.cli import main
    scans = root / "scans"
    scans.mkdir()
    for rel in CTS:
        os.symlink(data / rel, scans / rel.replace("/", "__"))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        os.environ[var] = str(root / var)
    if main(["import-scans", "-i", str(scans), "--dataset-id", "900", "--name", "BenchCT"]) != 0:
        sys.exit("preparing the real CTs failed")
    return 900


def loader_speed(dataset, volumes: int, workers: int) -> float:
    from himae_nnunet.pretrain.data import StepBatches, make_loader
    loader = iter(make_loader(dataset, StepBatches(0, volumes + 4, 1, 1), workers))
    for _ in range(4):  # worker start-up, first reads, and the prefetched batches
        next(loader)
    t0 = time.perf_counter()
    n = sum(next(loader)["image"].shape[0] for _ in range(volumes))
    return n / (time.perf_counter() - t0)


def make_stepper(model_name: str, stages: int, batches: list, device: torch.device, compile_: bool):
    """A function running one pretraining step (forward, backward, AdamW) on the next batch."""
    from himae_nnunet.models.hiend_mae import HiEndMAE
    from himae_nnunet.models.presets import model_config
    from himae_nnunet.core.optim import adamw, adamw_param_groups
    torch.manual_seed(0)
    model = HiEndMAE(model_config(model_name, stages=stages)).to(device)
    opt = adamw(adamw_param_groups(model, 0.05), device, lr=1e-4, betas=(0.9, 0.95))
    fwd = torch.compile(model) if compile_ else model
    amp = device.type == "cuda"
    count = [0]

    def one():
        x, perm = (t.to(device, non_blocking=True) for t in batches[count[0] % len(batches)])
        count[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = fwd(x, shuffle_indices=perm).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return one


def step_times(model_name: str, batches: list, steps: int, device: torch.device, compile_: bool) -> dict:
    """Median step time per B, B = 3 and B = 0 alternating step by step (fair under a shared, noisy CPU)."""
    steppers = {b: make_stepper(model_name, b, batches, device, compile_) for b in (3, 0)}
    return median_times_in_turns(steppers, steps, 2, device)  # 2 warm-up steps (and compilation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=int, nargs="+", help="prepared dataset ids (default: import ../shared/data)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--volumes", type=int, default=1, help="volumes per step (x 8 crops)")
    ap.add_argument("--loader-volumes", type=int, default=40, help="volumes timed for the loader")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    from himae_nnunet.pretrain.data import CropDataset, find_sources
    with tempfile.TemporaryDirectory() as tmp:
        ids = args.dataset or [prepare_real_cts(Path(tmp), Path(args.data))]
        sources = find_sources(ids)
        dataset = CropDataset(sources, (96, 96, 96), 8, seed=0, patch_size=16)
        crops_s = loader_speed(dataset, args.loader_volumes, workers=1)
        from himae_nnunet.models.presets import model_config
        p = model_config(args.model)["patch_size"]
        ds = CropDataset(sources, (96, 96, 96), 8, seed=1, patch_size=p)
        batches = []
        for i in range(min(args.steps, 3)):
            items = [ds[(i, 0, j)] for j in range(args.volumes)]
            batches.append((torch.cat([it["image"] for it in items]), torch.cat([it["perm"] for it in items])))
        device = torch.device(args.device)
        times = step_times(args.model, batches, args.steps, device, args.compile)
    n_cases = sum(len(s.identifiers) for s in sources)
    crops = args.volumes * 8
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"loader: {crops_s:.1f} crops/s (1 worker, 96^3, 8 crops/volume, augmented; {n_cases} real CTs)")
    print(f"step, median of {args.steps} ({args.model}, batch {args.volumes} x 8 = {crops} crops of 96^3, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}{', compiled' if args.compile else ''}):")
    for b, t in times.items():
        print(f"  {'Hi-End-MAE B=3' if b else 'MAE B=0       '}: {t * 1000:8.1f} ms/step  {crops / t:8.2f} crops/s")
    print(f"  ratio Hi-End-MAE / MAE step time: {times[3] / times[0]:.3f}")


if __name__ == "__main__":
    main()
