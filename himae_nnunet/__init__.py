"""himae-nnunet: Hi-End-MAE self-supervised pretraining and UNETR fine-tuning inside nnU-Net v2."""
import warnings

from himae_nnunet.core.version import __version__  # noqa: F401

# timm's import (through nnU-Net's network package too) triggers torch's torch.jit.interface notice: noise
warnings.filterwarnings("ignore", message=".*torch.jit.interface.* is deprecated", category=FutureWarning)


def load_checkpoint(path, device="cpu"):
    """The pretraining model (HiEndMAE) stored in a himae-nnunet checkpoint, in eval mode."""
    from himae_nnunet.checkpoint.format import load_checkpoint as _load
    return _load(path, device)
