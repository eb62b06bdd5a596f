"""The two UNETR decoders side by side: parameters, forward multiply-accumulates and (optionally) the time of a
training step (forward + backward), per input tile, for one encoder preset.

"ours" splits the ViT patch p into four integer upsamplings (p = 12: 3*2*2*1); "authors" is the authors'
topology (x2, x2, x2, trilinear resize to the input, 3x3 conv). MACs are counted by torch's flop counter on
the meta device (shapes only, nothing is computed); the encoder's count is the same for both.

    python benchmarks/unetr_decoders.py --preset vit_b12_1536 --tile 96 96 96 --feature-size 32
    python benchmarks/unetr_decoders.py --device cuda --steps 10       # adds the step time
"""
import argparse
import json
import statistics
import time

import torch

from himae_nnunet.models.flops import _count_macs
from himae_nnunet.models.unetr import DECODERS, UNETR


def build(preset: str, tile, feature_size: int, decoder: str, device) -> UNETR:
    with torch.device(device):
        return UNETR(1, 14, preset=preset, patch_size_voxels=tuple(tile), feature_size=feature_size,
                     keep_cls_token=decoder == "ours", decoder=decoder)


def count(preset: str, tile, feature_size: int, decoder: str) -> dict:
    """Parameters and forward GMACs of the whole network and of its decoder (meta device)."""
    net = build(preset, tile, feature_size, decoder, "meta")
    x = torch.empty(1, 1, *tile, device="meta")
    total = _count_macs(lambda: net(x))
    with torch.no_grad():
        final, hidden = net.encode(x)
        taps = [net.tokens_to_map(hidden[i]) for i in net.taps]
        final = net.tokens_to_map(final)
    dec = _count_macs(lambda: net.decoder(x, final, taps))
    return dict(params_m=sum(p.numel() for p in net.parameters()) / 1e6,
                decoder_params_m=sum(p.numel() for p in net.decoder.parameters()) / 1e6,
                gmacs=total / 1e9, decoder_gmacs=dec / 1e9)


def step_time(preset: str, tile, feature_size: int, decoder: str, device: str, steps: int, batch: int) -> float:
    """Median seconds of forward + backward (fp16 autocast on CUDA, fp32 on CPU) on random input."""
    torch.manual_seed(0)
    net = build(preset, tile, feature_size, decoder, device)
    x = torch.rand(batch, 1, *tile, device=device)
    times = []
    for i in range(steps + 1):  # the first step warms up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, enabled=device == "cuda"):
            loss = net(x).float().mean()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        net.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vit_b12_1536")
    ap.add_argument("--tile", type=int, nargs=3, default=[96, 96, 96])
    ap.add_argument("--feature-size", type=int, default=32)
    ap.add_argument("--device", help="also time a training step on this device (cpu, cuda)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    result = {}
    for decoder in DECODERS:
        r = count(args.preset, args.tile, args.feature_size, decoder)
        if args.device:
            r["train_step_s"] = step_time(args.preset, args.tile, args.feature_size, decoder, args.device,
                                          args.steps, args.batch)
        result[decoder] = r
        print(f"{decoder:8s} params {r['params_m']:.1f} M (decoder {r['decoder_params_m']:.2f} M), forward "
              f"{r['gmacs']:.1f} GMACs (decoder {r['decoder_gmacs']:.1f})"
              + (f", train step {r['train_step_s'] * 1e3:.0f} ms" if "train_step_s" in r else ""))
    result["ours_over_authors_decoder_gmacs"] = result["ours"]["decoder_gmacs"] / result["authors"]["decoder_gmacs"]
    print(json.dumps(dict(preset=args.preset, tile=args.tile, feature_size=args.feature_size, **result), indent=1))


if __name__ == "__main__":
    main()
