"""`himae-nnunet analyze rank|attention|reconstruct CHECKPOINT [...] (--image PATH | --dataset ID) --output DIR`."""
import argparse
import json
from pathlib import Path

import numpy as np

from himae_nnunet.core.errors import UserError

DEFINITION = ("per encoder block: A = attention values V (all heads side by side, D columns) of the patch tokens "
              "(cls excluded) of unmasked crops, stacked over crops ((crops * N) x D); effective_rank = "
              "-sum s_i log s_i with s_i = sigma_i / sum sigma (nats); exp_effective_rank = exp of it; "
              "singular_values = sigma / sqrt(rows), descending; per-crop mean/std: the same on each crop's "
              "N x D matrix")


# analysis -> (help, description)
ANALYSES = {
    "rank": ("effective rank and singular values of attention values V per encoder block -> rank.json + PNGs",
             "Effective rank -sum s log s (s = singular values / their sum) of each encoder block's attention "
             "values V; " + DEFINITION + ". Writes rank.json, rank_effective.png and rank_singular_values.png "
             "(checkpoints overlaid)."),
    "attention": ("attention maps of a query patch",
                  "Attention of the patch holding the query voxel to every patch, in an unmasked crop centred on "
                  "it, per head and head-averaged, at 0-based blocks (default: the decoder taps and the last "
                  "block, 3 6 9 11 = the paper's '3rd, 6th, 9th, 12th'). Default query: the body's centre. Writes "
                  "attention_NAME_slice.png (axial slice through the query), attention_NAME_mip.png (max "
                  "projection over z on the mean scan), attention_compare.png, attention_NAME.npz (maps) and "
                  "attention.json."),
    "reconstruct": ("masked input and reconstruction",
                    "Masks a crop centred on the query (one seeded permutation for all ratios) and reconstructs "
                    "it; axial, coronal and sagittal slices through the query. Masked patches are un-normalized "
                    "with the true patches' mean and std (as the authors do), so even a model that predicts "
                    "nothing shows their means. Writes reconstruct_NAME.png and reconstruct.json (MSE on masked "
                    "voxels)."),
}


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="himae-nnunet checkpoints (.pt); "
                        "authors' files: run `himae-nnunet import-official` first")
    src = common.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="a scan: NIfTI, NRRD, MHA or a DICOM series folder (resampled to each "
                                     "checkpoint's spacing and window)")
    src.add_argument("--dataset", help="an nnU-Net dataset id or name whose pretraining-preprocessed data to use")
    common.add_argument("--output", "-o", required=True, help="folder for the JSON and PNG files")
    common.add_argument("--label-map", help="with --image: a label map of the scan (for --query-label)")
    common.add_argument("--data-identifier", help="with --dataset: the preprocessed data folder (default: the "
                                                  "one whose plans spacing equals the checkpoint's)")
    common.add_argument("--case", help="with --dataset: the case for attention/reconstruct (default: the first)")
    common.add_argument("--max-cases", type=int, default=10, help="with --dataset: cases loaded at most (10)")
    common.add_argument("--seed", type=int, default=0, help="crop positions and masks (default 0)")
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")

    query = argparse.ArgumentParser(add_help=False)
    q = query.add_mutually_exclusive_group()
    q.add_argument("--query", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="query voxel, 0-based index (x, y, z) of the --image as read (as ITK/SimpleITK order "
                        "it); with --dataset an index into the preprocessed array in its own axis order")
    q.add_argument("--query-label", type=int, metavar="LABEL",
                   help="query at the centre of this label (needs --label-map, or a dataset's segmentation)")

    p = sub.add_parser("analyze", help="effective rank, attention maps and reconstructions of checkpoints")
    kinds = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for name, (help_text, description) in ANALYSES.items():
        k = kinds.add_parser(name, parents=[common] if name == "rank" else [common, query], help=help_text,
                             description=description)
        k.set_defaults(func={"rank": cmd_rank, "attention": cmd_attention, "reconstruct": cmd_reconstruct}[name])
        if name == "rank":
            k.add_argument("--crops", type=int, default=32, help="random tissue-centred crops (default 32)")
            k.add_argument("--batch-size", type=int, default=4)
        elif name == "attention":
            k.add_argument("--blocks", type=int, nargs="+", help="0-based encoder blocks (default: the taps and "
                                                                 "the last block, 3 6 9 11 for 12 blocks)")
        else:
            k.add_argument("--mask-ratios", type=float, nargs="+", default=[0.75, 0.85, 0.95])


class Inputs:
    """Checkpoints and the scan(s), the latter loaded once per (spacing, window) that a checkpoint asks for."""

    def __init__(self, args):
        from himae_nnunet.checkpoint.format import load_checkpoint
        import torch
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.label_map and not args.image:
            raise UserError("--label-map goes with --image (a dataset brings its own segmentations)")
        self.args = args
        self.models = [load_checkpoint(c, args.device) for c in args.checkpoints]
        self.names = unique_names(args.checkpoints)
        self._cache = {}
        self.out = Path(args.output)
        self.out.mkdir(parents=True, exist_ok=True)

    def volumes(self, model):
        from himae_nnunet.analysis.volumes import load_dataset_volumes, load_image_volume
        spacing, window = tuple(model.meta["spacing"]), tuple(model.meta["intensity_window"])
        key = (spacing, window)
        if key not in self._cache:
            a = self.args
            if a.image:
                self._cache[key] = [load_image_volume(a.image, spacing, window, a.label_map)]
            else:
                self._cache[key] = load_dataset_volumes(a.dataset, spacing, a.data_identifier, a.max_cases)
        return self._cache[key]

    def query_crop(self, model):
        """(volume, crop, query voxel inside the crop, query voxel in the volume, crop start)."""
        from himae_nnunet.analysis.volumes import (crop_around, default_query, query_from_image_index, query_from_label)
        vols = self.volumes(model)
        vol = vols[0]
        if self.args.case:
            match = [v for v in vols if v.name == self.args.case]
            if not match:
                raise UserError(f"case {self.args.case} not among {[v.name for v in vols]}")
            vol = match[0]
        if self.args.query is not None:
            voxel = query_from_image_index(vol, self.args.query)
        elif self.args.query_label is not None:
            voxel = query_from_label(vol, self.args.query_label)
        else:
            voxel = default_query(vol)
        crop, start = crop_around(vol.array, voxel, model.config["crop_size"])
        return vol, crop, tuple(int(v - s) for v, s in zip(voxel, start)), voxel, start

    def source(self) -> str:
        return self.args.image or f"nnU-Net dataset {self.args.dataset}"


def unique_names(paths) -> list[str]:
    stems = [Path(p).name.removesuffix(".pt").removesuffix(".pth") for p in paths]
    return [s if stems.count(s) == 1 else f"{Path(p).parent.name}_{s}" for s, p in zip(stems, paths)]


def describe(name, path, model) -> dict:
    m = model.meta
    return dict(name=name, path=str(path), preset=m.get("preset"), method=m.get("method"), stages=m.get("stages"),
                step=m.get("step"), spacing=m.get("spacing"), intensity_window=m.get("intensity_window"))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")


def cmd_rank(args) -> None:
    from himae_nnunet.analysis.rank import plot_rank, value_spectra
    from himae_nnunet.analysis.volumes import sample_crops
    if args.crops < 1:
        raise UserError("--crops must be at least 1")
    inp = Inputs(args)
    results = []
    for name, path, model in zip(inp.names, args.checkpoints, inp.models):
        crops = sample_crops(inp.volumes(model), args.crops, model.config["crop_size"], args.seed)
        layers = value_spectra(model, crops, args.device, args.batch_size, desc=name)
        results.append(dict(describe(name, path, model), layers=layers))
        print(f"{name}: effective rank of V per block: " + " ".join(f"{l['effective_rank']:.2f}" for l in layers))
    write_json(inp.out / "rank.json", dict(analysis="rank", definition=DEFINITION,
                                           source=inp.source(), crops=args.crops, seed=args.seed,
                                           checkpoints=results))
    for p in plot_rank(results, inp.out):
        print(f"wrote {p}")


def cmd_attention(args) -> None:
    from himae_nnunet.analysis.attention import (default_blocks, plot_attention, plot_comparison, query_attention, summary)
    inp = Inputs(args)
    entries, report = [], []
    for name, path, model in zip(inp.names, args.checkpoints, inp.models):
        blocks = args.blocks or default_blocks(model)
        bad = [b for b in blocks if not 0 <= b < model.config["depth"]]
        if bad:
            raise UserError(f"--blocks {bad} outside 0..{model.config['depth'] - 1} (0-based) for {name}")
        vol, crop, voxel, query, start = inp.query_crop(model)
        result = query_attention(model, crop, voxel, blocks, args.device)
        for mode in ("slice", "mip"):
            png = inp.out / f"attention_{name}_{mode}.png"
            plot_attention(model, crop, voxel, result, vol.spacing, name, png, mode)
            print(f"wrote {png}")
        np.savez_compressed(inp.out / f"attention_{name}.npz", crop=crop, query_voxel=np.array(voxel),
                            **{f"block{b}": r["maps"] for b, r in result["blocks"].items()})
        entries.append((name, model, crop, voxel, vol.spacing, result))
        report.append(dict(describe(name, path, model), case=vol.name, query_voxel_model_space=list(query),
                           crop_start=list(start), query_voxel_in_crop=list(voxel), **summary(result)))
    plot_comparison(entries, inp.out / "attention_compare.png")
    print(f"wrote {inp.out / 'attention_compare.png'}")
    write_json(inp.out / "attention.json", dict(analysis="attention", source=inp.source(), checkpoints=report))


def cmd_reconstruct(args) -> None:
    from himae_nnunet.analysis.reconstruct import plot_reconstructions, reconstruct_at
    from himae_nnunet.analysis.volumes import inside_mask
    inp = Inputs(args)
    report = []
    for name, path, model in zip(inp.names, args.checkpoints, inp.models):
        vol, crop, voxel, query, start = inp.query_crop(model)
        inside = inside_mask(vol.array.shape, start, crop.shape)
        results = reconstruct_at(model, crop, args.mask_ratios, args.seed, args.device, inside)
        plot_reconstructions(crop, voxel, results, vol.spacing, name, inp.out / f"reconstruct_{name}.png")
        print(f"wrote {inp.out / f'reconstruct_{name}.png'}")
        report.append(dict(describe(name, path, model), case=vol.name, query_voxel_model_space=list(query),
                           crop_start=list(start), ratios=[{k: v for k, v in r.items()
                                                            if k not in ("reconstruction", "visible")}
                                                           for r in results]))
    write_json(inp.out / "reconstruct.json", dict(analysis="reconstruct", source=inp.source(), seed=args.seed,
                                                  checkpoints=report))
