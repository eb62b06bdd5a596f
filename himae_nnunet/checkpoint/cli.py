"""Checkpoint commands: `import-official`."""
import json
from pathlib import Path


def register(sub) -> None:
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


def cmd_import_official(args) -> None:
    from himae_nnunet.checkpoint.official import import_official, official_config_from_json
    from himae_nnunet.core.errors import UserError
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
