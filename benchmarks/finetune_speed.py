"""Fine-tuning iteration time and sliding-window inference time per case: our UNETR vs nnU-Net's default
3d_fullres network (PlainConvUNet built from the dataset's nnUNetPlans, deep supervision on), same dataset.

Training step = what each trainer does per iteration: forward, nnU-Net's Dice + CE loss (deep-supervision
wrapper for the CNN), backward, gradient clipping (12 for nnU-Net, 1 for ours), optimizer step (SGD
momentum 0.99 nesterov for nnU-Net, AdamW for ours); fp16 autocast + GradScaler on CUDA as both trainers,
fp32 on CPU. Random batches: the loader is not timed here (see loader_speed.py). The two networks alternate
step by step and the median counts.
Inference = nnU-Net's nnUNetPredictor.predict_sliding_window_return_logits (tile step 0.5, Gaussian
weighting, no mirroring) on the largest case, each network on its own plans' grid (nnUNetPlans 3d_fullres
spacing / 1.5 mm for ours) with its own tile (plans patch size / UNETR input 96^3).
Without nnunetv2 (bare GPU machine) the same tiling is done by `sliding_window` below and reported as such.

    python benchmarks/finetune_speed.py --inputs benchmarks/gpu/finetune_inputs.json --device cuda
"""
import argparse
import json
import math
import pydoc
from pathlib import Path

import numpy as np
import torch

from timing import median_times_in_turns

CONFIG = "3d_fullres"


def plain_conv_unet(plans: dict, in_ch: int, classes: int) -> torch.nn.Module:
    """nnU-Net's get_network_from_plans, without importing nnunetv2 (dynamic_network_architectures only)."""
    arch = plans["configurations"][CONFIG]["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for k in arch["_kw_requires_import"]:
        if kwargs[k] is not None:
            kwargs[k] = pydoc.locate(kwargs[k])
    return pydoc.locate(arch["network_class_name"])(input_channels=in_ch, num_classes=classes,
                                                    deep_supervision=True, **kwargs)


def unetr(preset: str, tile, in_ch: int, classes: int) -> torch.nn.Module:
    from himae_nnunet.models import UNETR
    return UNETR(in_ch, classes, preset=preset, patch_size_voxels=tuple(tile))


def make_loss(deep_supervision_outputs: int, batch_dice: bool):
    """nnU-Net's DC_and_CE_loss (+ DeepSupervisionWrapper with its 1/2^i weights, last one 0)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if deep_supervision_outputs <= 1:
        return loss
    w = np.array([1 / 2 ** i for i in range(deep_supervision_outputs)])
    w[-1] = 0
    return DeepSupervisionWrapper(loss, w / w.sum())


def train_stepper(net, optimizer, clip: float, batch: int, tile, classes: int, device, batch_dice: bool):
    """One training iteration on a fixed random batch, as the trainers run it."""
    net.to(device).train()
    x = torch.rand(batch, 1, *tile, device=device)
    amp = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        outs = net(x)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    seg = torch.randint(0, classes, (batch, 1, *tile), device=device).float()
    targets = [torch.nn.functional.interpolate(seg, size=o.shape[2:], mode="nearest") for o in outs]
    loss_fn = make_loss(len(outs), batch_dice)
    target = targets if len(outs) > 1 else targets[0]
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(x), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}  # both trainers return it like this (a sync per step)
    return step


def nnunet_predictor(net, plans: dict, dataset_json: dict, tile, device):
    """nnUNetPredictor set up as the trainer's final validation does (manual_initialization)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
    cfg = dict(plans["configurations"][CONFIG], patch_size=list(tile))
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                           allow_tqdm=False)
    pred.manual_initialization(net, PlansManager(plans), ConfigurationManager(cfg), None, dataset_json,
                               "benchmark", None)
    return pred.predict_sliding_window_return_logits


def sliding_window(net, tile, classes: int, device):
    """The same tiling as nnU-Net (step 0.5, Gaussian sigma 1/8, fp16 accumulation) without nnunetv2."""
    tile = tuple(tile)
    g = np.zeros(tile)
    g[tuple(t // 2 for t in tile)] = 1
    from scipy.ndimage import gaussian_filter
    g = gaussian_filter(g, [t / 8 for t in tile], 0, mode="constant", cval=0)
    g = torch.from_numpy(g / g.max() * 10).half().to(device)
    g[g == 0] = g[g != 0].min()

    @torch.inference_mode()
    def run(image: torch.Tensor):
        net.to(device).eval()
        pad = [max(0, t - s) for t, s in zip(tile, image.shape[1:])]
        image = torch.nn.functional.pad(image, [q for p in reversed(pad) for q in (p // 2, p - p // 2)])
        shape = image.shape[1:]
        starts = []
        for s, t in zip(shape, tile):
            n = math.ceil((s - t) / (t * 0.5)) + 1
            starts.append([round((s - t) / max(1, n - 1) * i) for i in range(n)])
        image = image.to(device)
        logits = torch.zeros((classes, *shape), dtype=torch.half, device=device)
        weight = torch.zeros(shape, dtype=torch.half, device=device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            for a in starts[0]:
                for b in starts[1]:
                    for c in starts[2]:
                        sl = (slice(a, a + tile[0]), slice(b, b + tile[1]), slice(c, c + tile[2]))
                        out = net(image[(slice(None), *sl)][None])
                        out = out[0] if isinstance(out, (list, tuple)) else out
                        logits[(slice(None), *sl)] += out[0].float() * g
                        weight[sl] += g
        return logits / weight
    return run


def tile_count(shape, tile) -> int:
    return int(np.prod([math.ceil((max(s, t) - t) / (t * 0.5)) + 1 for s, t in zip(shape, tile)]))


def run(inputs: dict, device: torch.device, unetr_preset: str, quick: bool, steps: int, compile_: bool,
        quick_tile: int = 64) -> dict:
    plans, dataset_json = inputs["plans"], inputs["dataset_json"]
    classes = len(dataset_json["labels"])
    cfg = plans["configurations"][CONFIG]
    plain_tile, batch = list(cfg["patch_size"]), int(cfg["batch_size"])
    unetr_tile = [96, 96, 96]
    shape_iso = list(inputs["case_shape"])  # at 1.5 mm, z y x: our plans' grid
    tf = plans.get("transpose_forward", [0, 1, 2])
    shape_nn = [round(shape_iso[tf[i]] * 1.5 / cfg["spacing"][i]) for i in range(3)]  # nnUNetPlans' grid
    if quick:  # 2-core CPU: small tiles, batch 1, a crop of the case (2 x 2 x 2 tiles)
        plain_tile = unetr_tile = [quick_tile] * 3
        batch, edge = 1, quick_tile * 3 // 2
        shape_iso, shape_nn = [min(s, edge) for s in shape_iso], [min(s, edge) for s in shape_nn]
    torch.manual_seed(0)
    nets = {"nnunet_plainconvunet": plain_conv_unet(plans, 1, classes),
            f"unetr_{unetr_preset}": unetr(unetr_preset, unetr_tile, 1, classes)}
    tiles = dict(zip(nets, [plain_tile, unetr_tile]))
    shapes = dict(zip(nets, [shape_nn, shape_iso]))
    plain, ours = nets.values()
    optims = {"nnunet_plainconvunet": (torch.optim.SGD(plain.parameters(), 1e-2, momentum=0.99, nesterov=True,
                                                       weight_decay=3e-5), 12.0),
              f"unetr_{unetr_preset}": (torch.optim.AdamW(ours.parameters(), 1e-4, weight_decay=1e-5), 1.0)}
    if compile_:
        nets = {k: torch.compile(v) for k, v in nets.items()}
    steppers = {k: train_stepper(nets[k], *optims[k], batch, tiles[k], classes, device, cfg.get("batch_dice", False))
                for k in nets}
    step_s = median_times_in_turns(steppers, steps, 0 if quick else 1, device)  # quick: the no-grad pass above warms up

    plain.decoder.deep_supervision = False  # as nnU-Net's set_deep_supervision_enabled(False) for inference
    try:
        predictors = {k: nnunet_predictor(nets[k], plans, dataset_json, tiles[k], device) for k in nets}
        how = "nnunetv2 nnUNetPredictor.predict_sliding_window_return_logits"
    except ImportError as e:
        predictors = {k: sliding_window(nets[k], tiles[k], classes, device) for k in nets}
        how = f"nnU-Net-equivalent tiling in finetune_speed.py (nnunetv2 predictor not importable: {e.name})"
    images = {k: torch.rand(1, *shapes[k]) for k in nets}  # content does not change the time
    infer_s = median_times_in_turns({k: (lambda k=k, p=p: p(images[k])) for k, p in predictors.items()}, 1 if quick else 3,
                        0 if quick else 1, device)
    out = {"device": str(device), "classes": classes, "quick": quick,
           "inference": how, "tile_step": 0.5, "mirroring": False, "compiled": compile_,
           "amp": "fp16 autocast + GradScaler" if device.type == "cuda" else "fp32", "networks": {}}
    for k, net in nets.items():
        out["networks"][k] = {"tile": tiles[k], "batch": batch, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
                              "train_step_s": step_s[k], "infer_case_s": infer_s[k],
                              "case_shape": shapes[k], "tiles_per_case": tile_count(shapes[k], tiles[k])}
    n = out["networks"]
    u = n[f"unetr_{unetr_preset}"]
    out["unetr_over_nnunet_train_step"] = u["train_step_s"] / n["nnunet_plainconvunet"]["train_step_s"]
    out["unetr_over_nnunet_infer_case"] = u["infer_case_s"] / n["nnunet_plainconvunet"]["infer_case_s"]
    return out


def export_inputs(pre_folder: Path, pretrain_data: Path, dest: Path) -> dict:
    """Plans, dataset.json and the largest case's shape at 1.5 mm: all the GPU machine needs (no data)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    ds = infer_dataset_class(str(pretrain_data))(str(pretrain_data))
    shapes = [list(ds.load_case(c)[0].shape[1:]) for c in ds.identifiers]
    inputs = {"plans": json.loads((pre_folder / "nnUNetPlans.json").read_text()),
              "dataset_json": json.loads((pre_folder / "dataset.json").read_text()),
              "case_shape": max(shapes, key=np.prod), "case_shapes": shapes,
              "note": "written by benchmarks/run.py from the real CTs of ../shared/data (nnUNetPlans of the "
                      "imported dataset; case shapes at 1.5 mm); no image data"}
    if dest:
        dest.write_text(json.dumps(inputs, indent=1))
    return inputs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", required=True, help="JSON from export_inputs (plans, dataset.json, case shape)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--unetr-preset", default="vit_b12_1536")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="64^3 tiles, batch 1, case cropped to 96^3")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    res = run(json.loads(Path(args.inputs).read_text()), torch.device(args.device), args.unetr_preset,
              args.quick, args.steps, args.compile)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
