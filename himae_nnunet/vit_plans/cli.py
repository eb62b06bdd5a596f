"""Fine-tuning commands: `plan`, `split`, `ext-trainer-path`, `export-pretrained`, `train`, `predict`,
`compare`."""
import argparse
import json
import os
import sys
from pathlib import Path

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.nnunet_env import CONFIGURATION, dataset_id
from himae_nnunet.vit_plans.planning import DEFAULT_PLANS_NAME, DEFAULT_PRIMUS_PLANS_NAME, DEFAULT_UNETR, UNETR_DEFAULTS

DEFAULT_TRAINER = "nnUNetTrainerHiEndMAE"
PRETRAINED_WEIGHTS_TRAINER = "nnUNetTrainerUNETRPretrainedWeights"


def ext_trainer_path() -> str:
    import himae_nnunet.trainers.ext as ext
    return str(Path(ext.__file__).resolve().parent)


def ext_trainer_hint() -> str | None:
    """None when nnUNet_extTrainer names our folder; else the exact export line to run."""
    ours = ext_trainer_path()
    if ours in [str(Path(p).resolve()) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]:
        return None
    state = "is not set" if not os.environ.get("nnUNet_extTrainer") else "does not name our trainer folder"
    return (f"nnUNet_extTrainer {state}, so stock nnUNetv2_train / nnUNetv2_predict will not find "
            f"{DEFAULT_TRAINER}. Run:\n  export nnUNet_extTrainer={ours}"
            + (f"{os.pathsep}$nnUNet_extTrainer" if os.environ.get("nnUNet_extTrainer") else "")
            + "\n(or use `himae-nnunet train` / `himae-nnunet predict`, which set it)")


def with_ext_trainer_env() -> None:
    """Put our trainer folder first in nnUNet_extTrainer (this process and its children): the one line the
    nnUNetPredictor Python API needs (nnU-Net reads the variable when it looks a trainer up)."""
    ours = ext_trainer_path()
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if ours not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([ours, *current])


def paper_epochs_arg(text: str) -> int:
    from himae_nnunet.trainers.paper_protocol import parse_paper_epochs
    try:
        return parse_paper_epochs(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub) -> None:
    for add in (register_plan, register_split, register_export, register_find_best, register_passthrough):
        add(sub)


def register_plan(sub) -> None:
    p = sub.add_parser("plan", help="write ViT plans (spacing, window, patch, UNETR) for a dataset and checkpoint")
    p.add_argument("dataset", help="dataset id or name (DatasetXXX_Name)")
    p.add_argument("--checkpoint", required=True, help="pretrained checkpoint (ours or the authors' format)")
    p.add_argument("--plans-name", help=f"plans to write (default {DEFAULT_PLANS_NAME}; for a Primus checkpoint "
                                        f"{DEFAULT_PRIMUS_PLANS_NAME})")
    p.add_argument("--base-plans", default="nnUNetPlans", help="the dataset's nnU-Net plans to derive from")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="patch size in the plans' axis order, multiples of the ViT patch (default: the "
                        "pretraining crop, grown along axes the data fill, within --max-tokens)")
    p.add_argument("--max-tokens", type=int, help="token budget of the default patch (default 2x the crop's)")
    p.add_argument("--batch-size", type=int, default=2,
                   help="patches per step, split over the GPUs of `nnUNetv2_train -num_gpus N` (a multiple of N)")
    p.add_argument("--feature-size", type=int, default=32, help="UNETR decoder width (default 32)")
    p.add_argument("--unetr", choices=sorted(UNETR_DEFAULTS), default=DEFAULT_UNETR,
                   help="decoder: 'authors' = the authors' UNETR (x2 upsamplings, trilinear resize + 3x3 conv, no "
                        "cls token), 'ours' = p split into integer upsamplings, cls token kept (default "
                        f"{DEFAULT_UNETR})")
    p.add_argument("--drop-cls-token", action="store_true", help="fine-tune without the cls token (always so with "
                                                                  "--unetr authors)")
    p.add_argument("--fixed-pos-embed", action="store_true",
                   help="keep a fixed sin-cos position table (default: learnable, initialised from the checkpoint)")
    p.add_argument("--spacing", type=float, nargs=3, help="override the pretraining spacing (warns)")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), help="override the CT window (warns)")
    p.add_argument("--strict", action="store_true", help="refuse spacing or window that differ from pretraining")
    f = p.add_argument_group("fine-tuning options (stored in the plans' himae.finetune block; editable there)")
    f.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    f.add_argument("--weight-decay", type=float, help="default 1e-5")
    f.add_argument("--warmup-epochs", type=int, help="linear warmup epochs (default 50, at most a tenth of the run)")
    f.add_argument("--schedule", choices=["cosine", "poly"], help="decay after warmup (default cosine)")
    f.add_argument("--layer-decay", type=float, help="layer-wise LR decay of the encoder, e.g. 0.75 (default off)")
    f.add_argument("--freeze-encoder-epochs", type=int, help="encoder LR 0 for the first N epochs (default 0)")
    f.add_argument("--grad-clip", type=float, help="gradient-norm clip (default 1.0)")
    f.add_argument("--epochs", type=int, help="epochs of the base trainers (default nnU-Net's 1000; _Xepochs "
                                              "variants keep theirs)")
    f.add_argument("--iterations-per-epoch", type=int, help="default nnU-Net's 250")
    f.add_argument("--val-iterations-per-epoch", type=int, help="default nnU-Net's 50")
    f.add_argument("--paper-epochs", type=paper_epochs_arg, metavar="N|SETTING",
                   help="length for the _paper trainers in paper epochs (one iteration of 1 volume x 4 crops per "
                        "training case): a number, or one-shot (5000), 1%% (5000), 10%% (2000), 100%% (1000); "
                        "default 1000")
    f.add_argument("--no-tta-mirroring", dest="tta_mirroring", action="store_const", const=False,
                   help="validate and predict in one pass, without nnU-Net's 8x mirroring (CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace existing plans of the same name")
    p.add_argument("--preprocess", action="store_true", help="run nnU-Net preprocessing for the new plans")
    p.add_argument("-np", type=int, help="processes for fingerprinting/preprocessing (default: nnU-Net's, "
                                         "nnUNet_def_n_proc or 8)")
    p.set_defaults(func=cmd_plan)


def register_split(sub) -> None:
    p = sub.add_parser("split", help="add few-shot folds (one-shot, N %%, explicit cases) to splits_final.json")
    p.add_argument("dataset")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--shots", type=int, help="training cases per fold (1 = one-shot)")
    g.add_argument("--percent", type=float, help="percent of the pool's cases (at least one)")
    g.add_argument("--cases", nargs="+", help="explicit training case identifiers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="folds with different draws (seeds S, S+1, ...)")
    p.add_argument("--from-fold", type=int, help="draw from this fold's training cases, validate on its val cases")
    p.set_defaults(func=cmd_split)


def register_export(sub) -> None:
    p = sub.add_parser("ext-trainer-path", help="print the folder to put in nnUNet_extTrainer")
    p.add_argument("--export", action="store_true", help="print a shell `export` line instead")
    p.set_defaults(func=cmd_ext_trainer_path)

    p = sub.add_parser("export-pretrained",
                       help="write a full-network file for stock `nnUNetv2_train -pretrained_weights`")
    p.add_argument("--plans", required=True, help="plans JSON written by `himae-nnunet plan` "
                                                  "(nnUNet_preprocessed/DatasetXXX/NAME.json)")
    p.add_argument("--trainer", help="Primus plans: the stock nnU-Net Primus trainer to export for (default: the "
                                     "one of the checkpoint's size, e.g. nnUNet_Primus_S_Trainer for primus_s)")
    p.add_argument("--checkpoint", help="pretrained checkpoint (default: the one the plans name)")
    p.add_argument("-c", "--configuration", default=CONFIGURATION)
    p.add_argument("-o", "--output", required=True, help="file to write (.pth)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def register_find_best(sub) -> None:
    p = sub.add_parser("find-best", help="nnU-Net's find_best_configuration over explicit trainer/plans pairs "
                                       "(ours and nnU-Net's CNN baseline)")
    p.add_argument("dataset")
    p.add_argument("--model", action="append", metavar="TRAINER:PLANS[:CONFIGURATION]",
                   help=f"a trained model to compare (repeat; default nnUNetTrainer:nnUNetPlans and "
                        f"{DEFAULT_TRAINER}:{DEFAULT_PLANS_NAME}, configuration {CONFIGURATION})")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ensembles", action="store_true",
                   help="also evaluate pairwise ensembles (needs every fold trained with --npz)")
    p.add_argument("-np", type=int, help="processes (default: nnU-Net's)")
    p.set_defaults(func=cmd_find_best)


def register_passthrough(sub) -> None:
    for name, target in (("train", "nnUNetv2_train"), ("predict", "nnUNetv2_predict")):
        p = sub.add_parser(name, help=f"{target} with nnUNet_extTrainer set (defaults -tr {DEFAULT_TRAINER} "
                                      f"-p {DEFAULT_PLANS_NAME}); other arguments pass through",
                           prefix_chars="+")  # keep every '-' option for nnU-Net
        p.add_argument("args", nargs=argparse.REMAINDER, help=f"arguments of {target}")
        p.set_defaults(func=cmd_train if name == "train" else cmd_predict)


def cmd_plan(args) -> None:
    from himae_nnunet.vit_plans.planning import is_primus_plans, plan
    out = plan(args.dataset, args.checkpoint, args.plans_name, args.base_plans, args.overwrite, args.preprocess,
               args.np, patch_size=args.patch_size, batch_size=args.batch_size, feature_size=args.feature_size,
               keep_cls_token=False if args.drop_cls_token else None, unetr=args.unetr,
               learnable_pos_embed=not args.fixed_pos_embed,
               spacing=args.spacing, window=args.window, strict=args.strict, max_tokens=args.max_tokens,
               finetune=dict(initial_lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                             schedule=args.schedule, layer_decay=args.layer_decay, grad_clip=args.grad_clip,
                             freeze_encoder_epochs=args.freeze_encoder_epochs, num_epochs=args.epochs,
                             iterations_per_epoch=args.iterations_per_epoch,
                             val_iterations_per_epoch=args.val_iterations_per_epoch, tta_mirroring=args.tta_mirroring,
                             paper_epochs=args.paper_epochs))
    plans = json.loads(out.read_text())
    cfg = plans["configurations"][CONFIGURATION]
    ds = plans["dataset_name"]
    print(f"wrote {out}")
    print(f"  spacing {cfg['spacing']}, patch {cfg['patch_size']}, batch {cfg['batch_size']}, CT window "
          f"{plans['himae']['intensity_window']} -> [0, 1], data folder {cfg['data_identifier']}")
    if is_primus_plans(plans):
        return print_primus_next_steps(plans, args.preprocess)
    a = cfg["architecture"]["arch_kwargs"]
    print(f"  network UNETR ({a['decoder']} decoder), encoder {a['preset'] or 'custom'} (patch {a['patch_size']}, "
          f"dim {a['embed_dim']}, depth {a['depth']}), cls token {'kept' if a['keep_cls_token'] else 'dropped'}")
    print(f"  checkpoint {plans['himae']['checkpoint']} (sha256 {plans['himae']['checkpoint_sha256'][:16]}...)")
    print("next:")
    if not args.preprocess:
        print(f"  nnUNetv2_preprocess -d {dataset_id(ds)} -plans_name {plans['plans_name']} -c {CONFIGURATION}")
    trainer = f"{DEFAULT_TRAINER}_paper" if args.paper_epochs else DEFAULT_TRAINER  # --paper-epochs: their protocol
    print(f"  nnUNetv2_train {dataset_id(ds)} {CONFIGURATION} FOLD -tr {trainer} -p {plans['plans_name']}")
    print(gpu_note(cfg["batch_size"]))
    hint = ext_trainer_hint()
    if hint:
        print("NOTE: " + hint)


def print_primus_next_steps(plans: dict, preprocessed: bool) -> None:
    from himae_nnunet.vit_plans.primus_export import default_primus_trainer
    ds, name, enc = dataset_id(plans["dataset_name"]), plans["plans_name"], plans["himae"]["encoder"]
    trainer = default_primus_trainer(enc)
    print(f"  network: nnU-Net's {trainer} builds it (Primus {enc['preset'] or 'custom'}: dim {enc['embed_dim']}, "
          f"depth {enc['depth']}); these plans keep nnU-Net's architecture block, which that trainer ignores")
    print(f"  checkpoint {plans['himae']['checkpoint']} (sha256 {plans['himae']['checkpoint_sha256'][:16]}...)")
    print("next:")
    if not preprocessed:
        print(f"  nnUNetv2_preprocess -d {ds} -plans_name {name} -c {CONFIGURATION}")
    path = f"$nnUNet_preprocessed/{plans['dataset_name']}/{name}.json"
    print(f"  himae-nnunet export-pretrained --plans {path} -o primus_pretrained.pth")
    print(f"  nnUNetv2_train {ds} {CONFIGURATION} FOLD -tr {trainer} -p {name} -pretrained_weights primus_pretrained.pth")


def gpu_note(batch_size: int) -> str:
    fits = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
    return (f"multi-GPU: `nnUNetv2_train ... -num_gpus N` splits the batch of {batch_size} over N GPUs, so N must "
            f"divide it (here N = {', '.join(map(str, fits))}); for N GPUs with k patches each, plan with "
            f"--batch-size N*k (e.g. 4 GPUs x 2 = --batch-size 8)")


def cmd_split(args) -> None:
    from himae_nnunet.core.nnunet_env import dataset_name
    from himae_nnunet.vit_plans.splits import add_folds, splits_file
    name = dataset_name(args.dataset)
    folds, note = add_folds(name, shots=args.shots, percent=args.percent, cases=args.cases, seed=args.seed,
                            repeats=args.repeats, from_fold=args.from_fold)
    if note:
        print(note)
    for index, fold, new in folds:
        shown = ", ".join(fold["train"][:5]) + (" ..." if len(fold["train"]) > 5 else "")
        print(f"fold {index}{'' if new else ' (already present)'}: train {len(fold['train'])} [{shown}], "
              f"val {len(fold['val'])}")
    print(f"folds {' '.join(str(i) for i, _, _ in folds)} in {splits_file(name)}; train one with "
          f"`nnUNetv2_train {dataset_id(name)} {CONFIGURATION} {folds[0][0]} -tr {DEFAULT_TRAINER} -p {DEFAULT_PLANS_NAME}`")


def cmd_ext_trainer_path(args) -> None:
    print(f"export nnUNet_extTrainer={ext_trainer_path()}" if args.export else ext_trainer_path())


def cmd_export(args) -> None:
    from himae_nnunet.vit_plans.checks import check_plans_checkpoint, require_vit_plans
    from himae_nnunet.vit_plans.planning import is_primus_plans
    from himae_nnunet.vit_plans.weights import export_full_network
    plans_file = Path(args.plans)
    if not plans_file.is_file():
        raise UserError(f"--plans {plans_file} does not exist; give the JSON written by `himae-nnunet plan`")
    plans = json.loads(plans_file.read_text())
    if not is_primus_plans(plans):
        require_vit_plans(plans, args.configuration, f"export-pretrained --plans {plans_file}")
    elif args.configuration not in plans.get("configurations", {}):
        raise UserError(f"--plans {plans_file} have no configuration {args.configuration!r}")
    if args.trainer and not is_primus_plans(plans):
        raise UserError(f"--trainer {args.trainer}: only for Primus plans; {plans_file} are UNETR plans, whose "
                        f"file is for {PRETRAINED_WEIGHTS_TRAINER}")
    dataset_json = plans_file.parent / "dataset.json"
    if not dataset_json.is_file():
        raise UserError(f"{dataset_json} is missing (nnU-Net writes it when planning); run nnU-Net planning first")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite or choose another -o")
    pretrained = check_plans_checkpoint(plans, args.configuration, args.checkpoint)  # the trainer's checks
    ckpt = args.checkpoint or plans["himae"]["checkpoint"]
    if is_primus_plans(plans):
        return export_primus(args, plans, json.loads(dataset_json.read_text()), ckpt, out, pretrained)
    export_full_network(plans, json.loads(dataset_json.read_text()), ckpt, out, pretrained, args.configuration)
    print(f"wrote {out}; use it with stock nnU-Net and the trainer named for it (a results folder of its own):\n"
          f"  nnUNetv2_train {dataset_id(plans['dataset_name'])} {args.configuration} FOLD -tr "
          f"{PRETRAINED_WEIGHTS_TRAINER} -p {plans['plans_name']} -pretrained_weights {out}")


def export_primus(args, plans: dict, dataset_json: dict, ckpt, out: Path, pretrained) -> None:
    from himae_nnunet.vit_plans.primus_export import default_primus_trainer, export_primus_network
    trainer = args.trainer or default_primus_trainer(plans["himae"]["encoder"])
    report = export_primus_network(plans, dataset_json, ckpt, out, pretrained, trainer, args.configuration)
    print(f"wrote {out}: {len(report['loaded']) + len(report['resized']) + len(report['adapted'])} tensors from "
          f"pretraining (down_projection.*, eva.*), {len(report['random'])} at the trainer's own init; train with\n"
          f"  nnUNetv2_train {dataset_id(plans['dataset_name'])} {args.configuration} FOLD -tr {trainer} -p "
          f"{plans['plans_name']} -pretrained_weights {out}")


def parse_model(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"--model {text!r}: give TRAINER:PLANS or TRAINER:PLANS:CONFIGURATION")
    return dict(trainer=parts[0], plans=parts[1], configuration=parts[2] if len(parts) == 3 else CONFIGURATION)


def check_trained(name: str, model: dict, folds, ensembles: bool) -> None:
    """Every fold validated (and with probabilities for ensembles), before nnU-Net's selection starts."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    for fold in folds:
        folder = Path(get_output_folder(name, model["trainer"], model["plans"], model["configuration"], fold))
        train = (f"nnUNetv2_train {dataset_id(name)} {model['configuration']} {fold} -tr {model['trainer']} -p "
                 f"{model['plans']}" + (" --npz" if ensembles else ""))
        if not (folder / "validation" / "summary.json").is_file():
            raise UserError(f"{folder} has no validation results; train that fold first: {train}")
        if ensembles and not any((folder / "validation").glob("*.npz")):
            raise UserError(f"--ensembles needs the validation probabilities of {folder}; run `{train} --val` "
                            f"(or train with --npz)")


def cmd_find_best(args) -> None:
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration
    from himae_nnunet.core.nnunet_env import dataset_name
    name = dataset_name(args.dataset)
    models = [parse_model(m) for m in (args.model or ["nnUNetTrainer:nnUNetPlans",
                                                      f"{DEFAULT_TRAINER}:{DEFAULT_PLANS_NAME}"])]
    for model in models:
        if "__" in model["plans"] or "__" in model["trainer"]:
            raise UserError(f"--model {model['trainer']}:{model['plans']}: nnU-Net cannot tell names with '__' apart")
        check_trained(name, model, args.folds, args.ensembles)
    with_ext_trainer_env()
    result = find_best_configuration(name, models, allow_ensembling=args.ensembles,
                                     num_processes=args.np or default_num_processes, overwrite=True,
                                     folds=tuple(args.folds))
    best = result["best_model_or_ensemble"]
    print(f"best: {' + '.join(m['trainer'] + '__' + m['plans_identifier'] for m in best['selected_model_or_models'])} "
          f"(foreground Dice {best['result_on_crossval_pre_pp']:.4f} on folds {' '.join(map(str, args.folds))}); "
          f"all: " + ", ".join(f"{k} {v:.4f}" for k, v in result["all_results"].items()))


def passthrough(argv: list[str], defaults: dict) -> list[str]:
    argv = list(argv)
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    return argv


def check_train_args(argv: list[str]) -> None:
    """Clear messages for missing or non-ViT plans before nnU-Net starts."""
    pos = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or not argv[i - 1].startswith("-"))]
    if len(pos) < 3:
        return  # let nnU-Net print its usage
    from himae_nnunet.core.nnunet_env import dataset_name
    from himae_nnunet.vit_plans.planning import is_vit_plans, load_plans
    plans = load_plans(dataset_name(pos[0]), argv[argv.index("-p") + 1])
    if argv[argv.index("-tr") + 1].startswith(("nnUNetTrainerHiEndMAE", "nnUNetTrainerUNETR")) \
            and not is_vit_plans(plans, pos[1]):
        raise UserError(f"plans {plans['plans_name']!r} ({pos[1]}) are not ViT plans; run `himae-nnunet plan` "
                        f"and pass its --plans-name with -p")


def run_entry(entry, prog: str, argv: list[str]) -> int:
    with_ext_trainer_env()
    old = sys.argv
    sys.argv = [prog, *argv]
    try:
        entry()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return 0


def cmd_train(args) -> int:
    argv = passthrough(args.args, {"-tr": DEFAULT_TRAINER, "-p": DEFAULT_PLANS_NAME})
    check_train_args(argv)
    from nnunetv2.run.run_training import run_training_entry
    return run_entry(run_training_entry, "nnUNetv2_train", argv)


def cmd_predict(args) -> int:
    argv = passthrough(args.args, {"-tr": DEFAULT_TRAINER, "-p": DEFAULT_PLANS_NAME, "-c": CONFIGURATION})
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    return run_entry(predict_entry_point, "nnUNetv2_predict", argv)
