"""himae-nnunet: Hi-End-MAE self-supervised pretraining and UNETR fine-tuning inside nnU-Net v2."""
import warnings
from pathlib import Path

__version__ = "0.1.0"

# `pretrain/` and `trainers/` are top-level folders of the repository that install as himae_nnunet.pretrain and
# himae_nnunet.trainers (setup.py). Imported from a source checkout instead (e.g. `python -m ...` in the repo
# root), this package finds them beside its own folder.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "pretrain").is_dir() and (_checkout / "pretrain" / "__init__.py").is_file():
    __path__.append(str(_checkout))

# timm's import (through nnU-Net's network package too) triggers torch's torch.jit.interface notice: noise
warnings.filterwarnings("ignore", message=".*torch.jit.interface.* is deprecated", category=FutureWarning)


def load_checkpoint(path, device="cpu"):
    """The pretraining model (HiEndMAE) stored in a himae-nnunet checkpoint, in eval mode."""
    from .checkpoints import load_checkpoint as _load
    return _load(path, device)
