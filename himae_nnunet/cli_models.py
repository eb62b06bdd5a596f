"""Model-level commands: `presets`, `flops`, `import-official`."""
import json
from pathlib import Path

from .models.presets import PRESETS, model_config


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

    p = sub.add_parser("import-official", help="convert the authors' Hi-End-MAE checkpoint into ours")
    p.add_argument("src", help="the authors' .pth file (keys with or without 'module.')")
    p.add_argument("out", help="our checkpoint to write (.pt)")
    p.add_argument("--config", help="the authors' config.json (img_size, enc_dim, enc_heads, ...); needed only "
                                    "when no preset matches the weights' shapes")
    p.add_argument("--num-heads", type=int, help="encoder heads, when no preset matches and no --config")
    p.add_argument("--decoder-heads", type=int, help="decoder heads, when no preset matches and no --config")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_import_official)


def cmd_presets(args) -> None:
    for name in PRESETS:
        c = model_config(name)
        print(f"{name:14s} patch {c['patch_size']:2d}  encoder {c['embed_dim']}/{c['depth']}/{c['num_heads']}"
              f"  decoder {c['decoder_dim']}/{c['decoder_heads']}")


def cmd_flops(args) -> None:
    from .flops import count, format_table
    rows = [count(args.model, b, args.crop, args.mask_ratio) for b in args.stages]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))


def cmd_import_official(args) -> None:
    from .checkpoints import import_official, official_config_from_json
    from .errors import UserError
    config = None
    if args.config:
        try:
            config = official_config_from_json(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read --config {args.config}: {e}") from None
    meta, notes = import_official(args.src, args.out, config, args.num_heads, args.decoder_heads,
                                  args.mask_ratio, args.overwrite)
    m = meta["model"]
    print(f"imported {args.src} -> {args.out}")
    print(f"  model: patch {m['patch_size']}, encoder {m['embed_dim']}/{m['depth']}/{m['num_heads']}, decoder "
          f"{m['decoder_dim']}/{m['decoder_heads']}, B = {m['stages']}, crop {m['crop_size']}, "
          f"position embedding {m['pos_embed']}")
    print("  every encoder, decoder, projection and mask-token key was mapped")
    for n in notes:
        print(f"  {n}")
