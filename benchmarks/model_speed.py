"""Pretraining step speed of the model alone (synthetic crops, no data loading): Hi-End-MAE vs MAE.

For each preset: crops/s, step time and peak memory for B = 3 and B = 0 with the same encoder and batch,
their ratio, and on a GPU the model FLOPs utilisation (training FLOPs = 3 x forward, over the peak bf16 rate).

    python benchmarks/model_speed.py --device cpu --presets vit_tiny --batch 4 --steps 5
    python benchmarks/model_speed.py --device cuda --presets vit_b12_1536 vit_b16_768 --batch 32 --compile
"""
import argparse
import json
import platform

import torch

from timing import median_times_in_turns, sync

from himae_nnunet.core.optim import adamw, adamw_param_groups
from himae_nnunet.models.flops import count
from himae_nnunet.models import HiEndMAE, model_config

# dense bf16 spec sheet values; first matching name wins
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def make_step(preset: str, stages: int, batch: int, device: str, compile_: bool, crop: int):
    """One pretraining step (forward, backward, fused AdamW) of a fresh model on a fixed batch."""
    torch.manual_seed(0)
    model = HiEndMAE(model_config(preset, stages=stages, crop_size=crop)).to(device)
    opt = adamw(adamw_param_groups(model, 0.05), device, lr=1e-4, betas=(0.9, 0.95))
    step_model = torch.compile(model) if compile_ else model
    x = torch.rand(batch, 1, crop, crop, crop, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = step_model(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peak_memory_gib(preset, stages, batch, device, compile_, crop) -> float | None:
    """Peak GPU memory of a fresh model trained alone for two steps (weights, AdamW state, activations)."""
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = make_step(preset, stages, batch, device, compile_, crop)
    step(), step()
    sync(device)
    del step
    return torch.cuda.max_memory_allocated() / 2 ** 30


def compare(preset, batch, steps, warmup, device, compile_, crop) -> dict:
    """B = 3 and B = 0, same encoder and batch, steps in turns (fair under background load); median times."""
    steppers = {3: make_step(preset, 3, batch, device, compile_, crop),
                0: make_step(preset, 0, batch, device, compile_, crop)}
    times = median_times_in_turns(steppers, steps, warmup, device)
    out = {}
    peak = peak_tflops(device)
    for b, name in ((3, "hiend"), (0, "mae")):
        dt = times[b]
        gmacs = count(preset, b, crop)["total_gmacs"]
        train_flops = 3 * 2 * gmacs * 1e9 * batch  # fwd + 2x bwd
        r = {"preset": preset, "stages": b, "batch": batch, "crop": crop, "step_s": dt, "crops_per_s": batch / dt,
             "fwd_gmacs_per_crop": gmacs, "model_tflops_per_s": train_flops / dt / 1e12,
             "peak_mem_gib": None}
        if peak:
            r["mfu"] = train_flops / dt / (peak * 1e12)
        out[name] = r
    del steppers
    for b, name in ((3, "hiend"), (0, "mae")):  # eager only: a compiled model would compile again here
        out[name]["peak_mem_gib"] = None if compile_ else peak_memory_gib(preset, b, batch, device, False, crop)
    return {"preset": preset, **out, "hiend_over_mae_step_time": out["hiend"]["step_s"] / out["mae"]["step_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["vit_tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    info = {"machine": platform.node(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    print(json.dumps(info))
    results = []
    for preset in args.presets:
        r = compare(preset, args.batch, args.steps, args.warmup, args.device, args.compile, args.crop)
        results.append(r)
        h, m = r["hiend"], r["mae"]
        mfu = f", MFU {h['mfu']:.1%} / {m['mfu']:.1%}" if "mfu" in h else ""
        mem = f", peak {h['peak_mem_gib']:.1f} / {m['peak_mem_gib']:.1f} GiB" if h["peak_mem_gib"] else ""
        print(f"{preset}: Hi-End-MAE {h['crops_per_s']:.2f} crops/s vs MAE {m['crops_per_s']:.2f} crops/s "
              f"(step time ratio {r['hiend_over_mae_step_time']:.3f}){mem}{mfu}", flush=True)
    print(json.dumps({"info": info, "results": results}))
    return results


if __name__ == "__main__":
    main()
