from himae_nnunet.models.hiend_mae import HiEndMAE, MAEOutput
from himae_nnunet.models.presets import PRESETS, ConfigError, model_config
from himae_nnunet.models.unetr import UNETR
from himae_nnunet.models.vit import ViTEncoder3D, patchify, unpatchify

__all__ = ["HiEndMAE", "MAEOutput", "PRESETS", "ConfigError", "model_config", "UNETR", "ViTEncoder3D",
           "patchify", "unpatchify"]
