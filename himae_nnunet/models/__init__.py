from .hiend_mae import HiEndMAE, MAEOutput
from .presets import PRESETS, ConfigError, model_config
from .unetr import UNETR
from .vit import ViTEncoder3D, patchify, unpatchify

__all__ = ["HiEndMAE", "MAEOutput", "PRESETS", "ConfigError", "model_config", "UNETR", "ViTEncoder3D",
           "patchify", "unpatchify"]
