"""One pretraining step of our Hi-End-MAE and of the authors' (github.com/FengheTan9/Hi-End-MAE), same config,
same batch, same machine, interleaved step by step in one run (the order alternating); prints
`ours_over_authors_crops_per_s` per config.

Their code is never stored in this repository: fetch it yourself and give its folder,

    git clone https://github.com/FengheTan9/Hi-End-MAE /tmp/Hi-End-MAE
    python benchmarks/vs_authors.py --authors-code /tmp/Hi-End-MAE --configs vit_b16_768 --batch 2 --device cpu

Settings: theirs as their trainer runs (fp16 autocast + GradScaler on CUDA; fp32 on CPU; AdamW with their
decay groups, torch's default update); ours as our loop runs (bf16 autocast on CUDA, fp32 on CPU; SDPA
attention; fused AdamW on both). CPU runs use one thread unless --threads. Both get the same random batch of 96^3 crops in [0, 1]
and draw their own masks (mask ratio 0.75). Their code was written for timm 0.5.4; small import shims let it
run on the timm installed here (its `Block` calls the dropout argument `drop`, later timm's `proj_drop`;
MONAI, imported but unused for pretraining, is stubbed where absent), so both models use this environment's
timm blocks. Times are medians over `--steps` interleaved steps after `--warmup`: wall time on CUDA
(synchronized), CPU time of this process on CPU (what the step costs, not the other jobs of a shared machine).
"""
import argparse
import json
import platform
import statistics
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import make_step  # noqa: E402  (our step, as the model benchmark times it)
from timing import times_in_turns  # noqa: E402

# our preset -> (their builder in hi_end_mae.py, their patch size)
CONFIGS = {"vit_b16_768": ("build_vit_base_hi_end_mae_p16_3d", 16),
           "vit_b16_1536": ("build_vit_large_hi_end_mae_p16_3d", 16),
           "vit_b12_1536": ("build_vit_large_hi_end_mae_p12_3d", 12)}


def import_authors(code_dir: Path):
    """Their hi_end_mae module, importable with the installed timm (shims for two renamed timm names)."""
    import timm.layers
    import timm.models.vision_transformer as tvit
    if not (code_dir / "hi_end_mae.py").is_file() or not (code_dir / "networks" / "vit.py").is_file():
        sys.exit(f"--authors-code {code_dir}: no hi_end_mae.py and networks/vit.py there; clone "
                 f"https://github.com/FengheTan9/Hi-End-MAE and give its folder")
    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_3tuple = timm.layers.to_3tuple
    sys.modules.setdefault("timm.models.layers.helpers", helpers)

    class Block(tvit.Block):  # timm 0.5.4's `drop` is later timm's `proj_drop`
        def __init__(self, *args, drop: float = 0.0, **kwargs):
            super().__init__(*args, proj_drop=drop, **kwargs)
    tvit.Block = Block
    try:  # networks/vit.py imports MONAI's UNETR, which pretraining never uses
        import monai.networks.nets.unetr  # noqa: F401
    except ImportError:
        for name in ("monai", "monai.networks", "monai.networks.nets", "monai.networks.nets.unetr"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["monai.networks.nets.unetr"].UNETR = None
    sys.path.insert(0, str(code_dir))
    import hi_end_mae
    return hi_end_mae


def their_param_groups(model, weight_decay: float = 0.05) -> list:
    """Their trainer's groups: no decay for names containing their no-decay keys (as written there)."""
    nowd = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "gamma"}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in nowd) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_their_step(authors, config: str, batch: int, device: str):
    """One step of their model as their trainer.py runs it (autocast fp16 + GradScaler on CUDA)."""
    builder, patch = CONFIGS[config]
    args = Namespace(img_size=96, patch_size=patch, in_chans=1, pos_embed_type="sincos", mask_ratio=0.75)
    torch.manual_seed(0)
    quiet = sys.stdout
    sys.stdout = open("/dev/null", "w")  # their builders print the whole model
    try:
        model = getattr(authors, builder)(args).to(device)
    finally:
        sys.stdout.close()
        sys.stdout = quiet
    opt = torch.optim.AdamW(their_param_groups(model), lr=1e-4, betas=(0.9, 0.95))
    cuda = device == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    x = torch.rand(batch, 1, 96, 96, 96, device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            loss = model(x, return_image=False)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def compare(authors, config: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    steppers = {"ours": make_step(config, 3, batch, device, False, 96),
                "authors": make_their_step(authors, config, batch, device)}
    clock = time.perf_counter if device == "cuda" else time.process_time
    times = times_in_turns(steppers, steps, warmup, device, clock)  # order alternates: neither always goes first
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": config, "batch": batch, "device": device, "steps": steps,
            "ours_step_s": med["ours"], "authors_step_s": med["authors"],
            "ours_crops_per_s": batch / med["ours"], "authors_crops_per_s": batch / med["authors"],
            "ours_over_authors_crops_per_s": med["authors"] / med["ours"],
            "clock": "wall" if device == "cuda" else "process_cpu", "times": times}


def largest_batch_compare(authors, config, batch, steps, warmup, device) -> dict:
    """compare() at `batch`, halved while either model runs out of GPU memory (both always get the same)."""
    while True:
        try:
            return compare(authors, config, batch, steps, warmup, device)
        except torch.OutOfMemoryError:
            if batch <= 1:
                raise
            torch.cuda.empty_cache()
            print(f"{config}: batch {batch} does not fit; trying {batch // 2}", flush=True)
            batch //= 2


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors-code", required=True, help="folder of a clone of FengheTan9/Hi-End-MAE")
    ap.add_argument("--configs", nargs="+", default=["vit_b12_1536"], choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=24 * 8, help="crops per step (paper: 24 volumes x 8 per GPU)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    authors = import_authors(Path(args.authors_code).resolve())
    info = {"machine": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    results = []
    for config in args.configs:
        r = largest_batch_compare(authors, config, args.batch, args.steps, args.warmup, args.device)
        results.append(r)
        print(f"{config} batch {args.batch} on {info['device']}: ours {r['ours_crops_per_s']:.3f} crops/s, authors "
              f"{r['authors_crops_per_s']:.3f} crops/s, ours_over_authors_crops_per_s "
              f"{r['ours_over_authors_crops_per_s']:.3f}", flush=True)
    print(json.dumps({"info": info, "results": results}))
    return results


if __name__ == "__main__":
    main()
