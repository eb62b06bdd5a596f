"""`himae-nnunet compare` (low-label comparison of pretraining arms) and `evidence-dataset` (the real-CT data)."""
import os
import shutil
from pathlib import Path

from himae_nnunet.core.errors import UserError
from himae_nnunet.evidence.prepare import PROTOCOLS


def register(sub) -> None:
    p = sub.add_parser("compare", help="few-shot comparison of arms (scratch, pretrained checkpoints, nnU-Net) "
                                       "through stock nnU-Net, with bootstrap intervals and paired tests")
    p.add_argument("dataset", help="dataset id or name in nnUNet_raw, with imagesTs/labelsTs as the test set")
    p.add_argument("-o", "--output", required=True, help="comparison folder (own nnU-Net folders, cells, report); "
                                                         "re-running with it resumes")
    p.add_argument("--pretrained", action="append", default=[], metavar="NAME=CHECKPOINT", required=True,
                   help="one arm per pretrained checkpoint (ours, MAE, imported, or a Primus one: then nnU-Net's "
                        "stock Primus trainer fine-tunes it, against a scratch_primus arm); repeatable; the first "
                        "ViT checkpoint's plans (network, spacing, window) also serve the scratch arm")
    p.add_argument("--shots", type=int, nargs="+", default=[], help="label budgets in training cases, e.g. 1 2 5")
    p.add_argument("--percent", type=float, nargs="+", default=[], help="label budgets in percent of the cases")
    p.add_argument("--draws", type=int, default=3, help="seeded draws of training cases per budget (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first draw (draws use seed, seed+1, ...)")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                   help="full fine-tuning and/or frozen encoder (only the UNETR decoder trains); default both")
    p.add_argument("--no-scratch", dest="scratch", action="store_false", help="leave out the from-scratch UNETR")
    p.add_argument("--no-nnunet", dest="nnunet", action="store_false", help="leave out nnU-Net's own CNN")
    g = p.add_argument_group("shared fine-tuning budget (every arm)")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--iterations-per-epoch", type=int, default=25)
    g.add_argument("--val-iterations-per-epoch", type=int, default=5)
    g.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="patch in the plans' axis order, multiples of the ViT patch (default: `himae-nnunet plan`'s)")
    g.add_argument("--batch-size", type=int, default=2)
    g.add_argument("--feature-size", type=int, default=16, help="UNETR decoder width (default 16)")
    g.add_argument("--lr", type=float, help="UNETR AdamW learning rate (default the plans', 1e-4); nnU-Net keeps its own")
    g.add_argument("--warmup-epochs", type=int, help="UNETR warmup epochs (capped at a tenth of --epochs)")
    g.add_argument("--tta-mirroring", action="store_true", help="nnU-Net's 8x mirroring at prediction (slow on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("-np", type=int, default=1, help="processes for planning and preprocessing (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1); they share the "
                                                        "device, so use more only where it has room")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished cells; train nothing")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evidence-dataset", help="write the real-CT comparison dataset: axial slabs of patient A "
                                                "train, patient B tests (../shared/data)")
    p.add_argument("--data", required=True, help="the shared real-data folder (ct_abdomen_ts_full, ct_abdomen_ts_dicom)")
    p.add_argument("--dataset-id", type=int, default=520)
    p.add_argument("--slabs", type=int, default=4, help="training cases cut from patient A's abdomen (default 4)")
    p.set_defaults(func=cmd_dataset)


def parse_arms(values: list[str]) -> dict:
    arms = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--pretrained {v!r}: write NAME=CHECKPOINT, e.g. --pretrained hiend=run/checkpoint_final.pt")
        if name in arms or name in ("scratch", "nnunet") or not name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"--pretrained {v!r}: arm names must be unique letters/digits/-/_ and not "
                            f"'scratch' or 'nnunet'")
        if not Path(path).is_file():
            raise UserError(f"--pretrained {v!r}: checkpoint {path} does not exist")
        arms[name] = str(Path(path).resolve())
    return arms


def checked_dataset(args, out: Path) -> tuple[str, Path, dict]:
    """Dataset name, its raw folder and the nnU-Net environment; an output folder this call made is removed
    again when the dataset cannot be used."""
    from himae_nnunet.core.nnunet_env import dataset_name, require_folder
    from himae_nnunet.evidence import prepare
    raw_root, made = require_folder("nnUNet_raw"), not out.exists()
    env = prepare.nnunet_env(out, args.device)  # before the dataset lookup: our own preprocessed folder
    try:
        name = dataset_name(args.dataset)
        for sub in ("imagesTs", "labelsTs"):
            if not any((raw_root / name / sub).glob("*")):
                raise UserError(f"{raw_root / name / sub} is missing or empty: the comparison tests on "
                                f"imagesTs/labelsTs")
    except UserError:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return name, raw_root / name, env


def cmd_compare(args) -> None:
    from himae_nnunet.evidence import cells as cells_mod, prepare, report
    if not args.shots and not args.percent:
        raise UserError("give at least one label budget: --shots 1 2 5 and/or --percent 10")
    if args.draws < 1:
        raise UserError(f"--draws {args.draws} must be at least 1")
    arms = parse_arms(args.pretrained)  # every check before the output folder is made
    out = Path(args.output).resolve()
    name, raw, env = checked_dataset(args, out)
    if args.device == "cpu" and args.jobs > 1:  # our trainers give each cell its share of the cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    s = prepare.Settings(dataset=name, pretrained=arms, shots=args.shots,
                         percent=args.percent, draws=args.draws, seed=args.seed, protocols=args.protocols,
                         scratch=args.scratch, nnunet=args.nnunet, patch_size=args.patch_size,
                         batch_size=args.batch_size, feature_size=args.feature_size, epochs=args.epochs,
                         iterations_per_epoch=args.iterations_per_epoch,
                         val_iterations_per_epoch=args.val_iterations_per_epoch, lr=args.lr,
                         warmup_epochs=args.warmup_epochs, tta_mirroring=args.tta_mirroring, device=args.device,
                         num_processes=args.np)
    prepare.check_settings(out, s)
    if not args.report_only:
        prepare.prepare_plans(out, s, env)
    folds = prepare.make_folds(out, s)
    cells = cells_mod.build_cells(s, folds, out)
    if not args.report_only:
        cells_mod.run_cells(out, s, raw, cells, env, args.jobs)
    written = report.write_report(out, s, folds, cells)
    print("wrote " + ", ".join(str(p.relative_to(out)) for p in written) + f" in {out}")


def cmd_dataset(args) -> None:
    from himae_nnunet.core.nnunet_env import require_folder, require_free_dataset_id
    from himae_nnunet.evidence.realct import write_slab_dataset
    require_free_dataset_id(args.dataset_id)
    folder = write_slab_dataset(args.data, require_folder("nnUNet_raw"), args.dataset_id, slabs=args.slabs)
    print(f"wrote {folder}: {args.slabs} training slabs of patient A, test case patient B (imagesTs/labelsTs)")
