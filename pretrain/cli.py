"""Pretraining commands: `prepare-pretrain`, `import-scans`, `pretrain`."""
from himae_nnunet.core.ct import DEFAULT_SPACING, DEFAULT_WINDOW
from himae_nnunet.models.presets import ENCODERS, PRESETS


def _prep_options(p, with_crop=True) -> None:
    p.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING), metavar=("Z", "Y", "X"),
                   help="target voxel size in mm (default 1.5 1.5 1.5, the paper's)")
    p.add_argument("--window", type=float, nargs=2, default=list(DEFAULT_WINDOW), metavar=("LOW", "HIGH"),
                   help="HU window mapped to [0, 1] (default -175 250, the paper's)")
    p.add_argument("--crop-size", type=int, nargs="+", default=[96], help="crop size the data is chunked for")
    p.add_argument("--plans-name", help="name of the pretraining plans (default nnUNetPlans_himaePretrain, with a "
                                        "suffix when spacing or window differ from the paper's)")
    p.add_argument("--source-plans", default="nnUNetPlans",
                   help="the dataset's nnU-Net plans to copy (default nnUNetPlans; planned if missing)")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="nnU-Net preprocessing workers")
    p.add_argument("--overwrite", action="store_true", help="redo the pretraining plans and data")
    p.add_argument("--allow-non-ct", action="store_true", help="accept scans whose intensities do not look like CT "
                                                               "in HU (no air below -500); they are windowed as HU")


def register(sub) -> None:
    """Declarations only (one call per option), long because the three commands have many options."""
    p = sub.add_parser("prepare-pretrain", help="write pretraining plans and run nnU-Net preprocessing for "
                                                "datasets in nnUNet_raw (existing plans and data stay untouched)")
    p.add_argument("--dataset", "-d", action="append", required=True, help="dataset id or name; repeatable")
    _prep_options(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("import-scans", help="unlabelled scans (NIfTI, NRRD, MHA, DICOM folders) -> a new nnU-Net "
                                            "dataset, prepared for pretraining")
    p.add_argument("--input", "-i", required=True, help="folder with the scans (searched recursively)")
    p.add_argument("--dataset-id", type=int, required=True, help="a free nnU-Net dataset id (1-999)")
    p.add_argument("--name", required=True, help="dataset name: DatasetXXX_NAME")
    p.add_argument("--skip-bad-cases", action="store_true", help="leave unreadable or invalid scans out (listed) "
                                                                 "instead of stopping")
    p.add_argument("--no-prepare", action="store_true", help="only write the raw dataset")
    _prep_options(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("pretrain", help="Hi-End-MAE (or MAE) pretraining on prepared datasets; "
                                        "multi-GPU: torchrun --nproc_per_node N -m himae_nnunet.cli pretrain ...")
    p.add_argument("--dataset", "-d", action="append", required=True, help="dataset id or name; repeatable")
    p.add_argument("--weights", type=float, nargs="+", help="sampling weight per --dataset (default: by case count)")
    p.add_argument("--output", "-o", required=True, help="run folder (checkpoints, log.jsonl, previews)")
    p.add_argument("--model", default="vit_b12_1536", choices=list(PRESETS),
                   help="encoder preset: vit_* (our ViT) or primus_* (nnU-Net's Primus encoder; S/B/M/L are the "
                        "stock nnUNet_Primus_*_Trainer sizes)")
    p.add_argument("--encoder", choices=list(ENCODERS), help="encoder kind; must agree with --model's (optional)")
    p.add_argument("--method", default="hiend", choices=["hiend", "mae"], help="hiend (dense decoder) or mae")
    p.add_argument("--stages", type=int, help="dense decoder stages B, 1-3 (default 3; mae means 0)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--pos-embed", choices=["sincos", "learnable"],
                   help="ViT position embedding: fixed 3D sin-cos (default) or learnable, initialised normal "
                        "with std 0.02 (the authors' 'perceptron' option); Primus: learnable only; the decoder's "
                        "stays sin-cos")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps of the run (with --resume: "
                                                           "continue up to this total)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default min(4000, steps/10)), then cosine")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4, the paper's for 192 "
                                                           "crops/step; not rescaled with the batch, as in the "
                                                           "authors' code)")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default: no clipping)")
    p.add_argument("--batch-volumes", type=int, default=2, help="volumes per process and micro-batch")
    p.add_argument("--crops-per-volume", type=int, default=8)
    p.add_argument("--crop-size", type=int, default=96, help="cubic crop edge, a multiple of the patch size")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write checkpoint_latest.pt every K steps")
    p.add_argument("--preview-every", type=int, help="PNG preview every K steps (default: --checkpoint-every; 0 off)")
    p.add_argument("--log-every", type=int, help="log.jsonl / TensorBoard every K steps (default 1 on CPU, 20 on "
                                                 "CUDA, where each log point waits for the GPU once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--workers", type=int, default=4, help="loader worker processes per GPU/process (0: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output exactly where it stopped")
    p.add_argument("--stop-at", type=int, help="end this invocation after that step (checkpoint written), e.g. to "
                                               "fit a job's time slot; continue later with --resume")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--plans-name", help="pretraining plans to read (default: the one prepare-pretrain wrote)")
    p.add_argument("--skip-bad-cases", action="store_true", help="leave unreadable preprocessed cases out")
    p.add_argument("--fixed-batch", action="store_true", help="train on the same batch every step (sanity check "
                                                              "that the model can overfit)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no flips, rotations, intensity")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.set_defaults(func=cmd_pretrain)


def _crop(values) -> tuple:
    from himae_nnunet.core.errors import UserError
    if len(values) not in (1, 3):
        raise UserError(f"--crop-size {values}: give one or three sizes")
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


def _prepare_kwargs(args) -> dict:
    return dict(spacing=args.spacing, window=args.window, crop_size=_crop(args.crop_size),
                plans_name=args.plans_name, source_plans=args.source_plans, num_processes=args.num_processes,
                overwrite=args.overwrite, allow_non_ct=args.allow_non_ct)


def cmd_prepare(args) -> None:
    from himae_nnunet.pretrain.prepare import prepare_dataset
    for ds in args.dataset:
        prepare_dataset(ds, **_prepare_kwargs(args))


def cmd_import(args) -> None:
    from himae_nnunet.core.errors import UserError
    from himae_nnunet.pretrain.prepare import import_scans, prepare_dataset
    folder = import_scans(args.input, args.dataset_id, args.name, skip_bad_cases=args.skip_bad_cases,
                          allow_non_ct=args.allow_non_ct)
    if not args.no_prepare:
        try:
            prepare_dataset(folder.name, check_images=False, **_prepare_kwargs(args))
        except UserError as e:
            raise UserError(f"{e}\n{folder} was imported; after fixing the cause, run `himae-nnunet "
                            f"prepare-pretrain --dataset {args.dataset_id}`") from None
    print(f"pretrain on it: himae-nnunet pretrain --dataset {args.dataset_id} --output RUN_FOLDER")


def cmd_pretrain(args) -> None:
    from himae_nnunet.pretrain.loop import run_pretraining
    from himae_nnunet.pretrain.options import PretrainOptions
    fields = PretrainOptions.__dataclass_fields__
    opts = PretrainOptions(datasets=args.dataset, **{k: v for k, v in vars(args).items()
                                                     if k in fields and k != "datasets"})
    run_pretraining(opts)
