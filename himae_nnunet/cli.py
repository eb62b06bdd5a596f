"""`himae-nnunet` command line: one subcommand per stage of the workflow.

Each feature module exposes `register(subparsers)`, which adds its parser and sets `func`; this file
only collects them, so adding a command never touches another's code. Errors a user can fix
(`UserError`) print one line-block message and exit 2, without a traceback.
"""
import argparse
import importlib
import sys

from himae_nnunet.core.errors import UserError
from himae_nnunet.core.version import __version__

# modules with a register(subparsers) function, in the order of the workflow
COMMAND_MODULES = [
    "himae_nnunet.models.cli",  # presets, flops
    "himae_nnunet.checkpoint.cli",  # import-official
    "himae_nnunet.pretrain.cli",  # prepare-pretrain, import-scans, pretrain
    "himae_nnunet.vit_plans.cli",  # plan, split, ext-trainer-path, export-pretrained, train, predict
    "himae_nnunet.analysis.cli",  # analyze rank|attention|reconstruct
    "himae_nnunet.demo.run",  # demo, make-synthetic
    "himae_nnunet.evidence.cli",  # compare, evidence-dataset
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="himae-nnunet",
        description="Hi-End-MAE self-supervised pretraining and UNETR fine-tuning for nnU-Net v2.")
    parser.add_argument("--version", action="version", version=f"himae-nnunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"himae-nnunet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"himae-nnunet {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
