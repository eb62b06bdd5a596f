"""Pretraining step speed of the model alone (synthetic crops, no data loading): Hi-End-MAE vs MAE.

For each preset: crops/s, step time and peak memory for B = 3 and B = 0 with the same encoder and batch,
their ratio, and on a GPU the model FLOPs utilisation (training FLOPs = 3 x forward, over the peak bf16 rate).

    python benchmarks/model_speed.py --device cpu --presets vit_tiny --batch 4 --steps 5
    python benchmarks/model_speed.py --device cuda --presets vit_b12_1536 vit_b16_768 --batch 32 --compile
"""
import argparse
import json
import platform
import time

import torch

from himae_nnunet.flops import count
from himae_nnunet.models import HiEndMAE, model_config

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def no_decay_groups(model, weight_decay=0.05):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "token" in n or "pos_embed" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def time_steps(preset: str, stages: int, batch: int, steps: int, warmup: int, device: str, compile_: bool,
               crop: int) -> dict:
    torch.manual_seed(0)
    model = HiEndMAE(model_config(preset, stages=stages, crop_size=crop)).to(device)
    opt = torch.optim.AdamW(no_decay_groups(model), lr=1e-4, betas=(0.9, 0.95), fused=device == "cuda")
    step_model = torch.compile(model) if compile_ else model
    x = torch.rand(batch, 1, crop, crop, crop, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = step_model(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    out = {"preset": preset, "stages": stages, "batch": batch, "crop": crop, "step_s": dt, "crops_per_s": batch / dt}
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    peak = peak_tflops(device)
    if peak:
        train_flops = 3 * 2 * count(preset, stages, crop)["total_gmacs"] * 1e9 * batch  # fwd + 2x bwd
        out["mfu"] = train_flops / dt / (peak * 1e12)
    return out


def compare(preset, batch, steps, warmup, device, compile_, crop) -> dict:
    hiend = time_steps(preset, 3, batch, steps, warmup, device, compile_, crop)
    mae = time_steps(preset, 0, batch, steps, warmup, device, compile_, crop)
    return {"preset": preset, "hiend": hiend, "mae": mae, "hiend_over_mae_step_time": hiend["step_s"] / mae["step_s"]}


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
        mem = f", peak {h['peak_mem_gib']:.1f} / {m['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in h else ""
        print(f"{preset}: Hi-End-MAE {h['crops_per_s']:.2f} crops/s vs MAE {m['crops_per_s']:.2f} crops/s "
              f"(step time ratio {r['hiend_over_mae_step_time']:.3f}){mem}{mfu}", flush=True)
    print(json.dumps({"info": info, "results": results}))
    return results


if __name__ == "__main__":
    main()
