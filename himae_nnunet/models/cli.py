"""Model commands: `presets`, `flops`."""
import json

from himae_nnunet.models.presets import PRESETS, model_config


def register(sub) -> None:
    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("flops", help="parameters and forward multiply-accumulates per crop")
    p.add_argument("--model", default="vit_b12_1536", choices=list(PRESETS), help="model preset")
    p.add_argument("--stages", type=int, nargs="+", default=[3],
                   help="dense decoder stages B (0 = MAE baseline); several values print one row each")
    p.add_argument("--crop", type=int, default=96, help="cubic crop edge in voxels (default 96)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    p.set_defaults(func=cmd_flops)


def cmd_presets(args) -> None:
    for name in PRESETS:
        c = model_config(name)
        print(f"{name:14s} patch {c['patch_size']:2d}  encoder {c['embed_dim']}/{c['depth']}/{c['num_heads']}"
              f"  decoder {c['decoder_dim']}/{c['decoder_heads']}")


def cmd_flops(args) -> None:
    from himae_nnunet.models.flops import count, format_table
    rows = [count(args.model, b, args.crop, args.mask_ratio) for b in args.stages]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
