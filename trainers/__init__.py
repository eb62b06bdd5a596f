"""nnU-Net trainer classes (installed as himae_nnunet.trainers); nnU-Net finds them through
`nnUNet_extTrainer` = `himae-nnunet ext-trainer-path` (the ext/ folder re-exports them)."""
from himae_nnunet.trainers.finetune import (nnUNetTrainerHiEndMAE, nnUNetTrainerUNETR,  # noqa: F401
                                            nnUNetTrainerUNETRPretrainedWeights)
from himae_nnunet.trainers.variants import *  # noqa: F401,F403
from himae_nnunet.trainers.paper import *  # noqa: F401,F403
from himae_nnunet.trainers.budget import *  # noqa: F401,F403
