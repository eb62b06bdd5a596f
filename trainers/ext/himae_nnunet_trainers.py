"""Imported by nnU-Net as a top-level module when this folder is in nnUNet_extTrainer: re-export only."""
from himae_nnunet.trainers import *  # noqa: F401,F403
from himae_nnunet.trainers.finetune import (nnUNetTrainerHiEndMAE, nnUNetTrainerUNETR,  # noqa: F401
                                            nnUNetTrainerUNETRPretrainedWeights)
