"""Schedule variants in nnU-Net's `_Xepochs` naming, counted in NNU-NET epochs, exactly as nnU-Net's own
`nnUNetTrainer_Xepochs`: X epochs of 250 iterations (or the plans' `iterations_per_epoch`), each a batch of the
plans' batch_size crops (2 by default) from different volumes; `_5000epochs` = 1.25 M iterations = 2.5 M crops.
They are NOT the paper's schedules: a paper epoch is one iteration of 1 volume x 4 crops per training case, so
the paper's one-shot 5000 epochs are 5000 iterations (20k crops). For the paper's protocol and units use
trainers/paper.py (`nnUNetTrainerHiEndMAE_paper_oneshot` / `_1pct` / `_10pct` / `_100pct`, or `_paper` with
`himae-nnunet plan --paper-epochs N`).
The smoke variants: two epochs of ten iterations, two validation iterations, no test-time mirroring (CPU smoke
tests only)."""
import torch

from himae_nnunet.trainers.finetune import (nnUNetTrainerHiEndMAE, nnUNetTrainerUNETR,
                                            nnUNetTrainerUNETRPretrainedWeights)


class nnUNetTrainerHiEndMAE_100epochs(nnUNetTrainerHiEndMAE):
    EPOCHS = 100


class nnUNetTrainerHiEndMAE_250epochs(nnUNetTrainerHiEndMAE):
    EPOCHS = 250


class nnUNetTrainerHiEndMAE_500epochs(nnUNetTrainerHiEndMAE):
    EPOCHS = 500


class nnUNetTrainerHiEndMAE_2000epochs(nnUNetTrainerHiEndMAE):
    EPOCHS = 2000


class nnUNetTrainerHiEndMAE_5000epochs(nnUNetTrainerHiEndMAE):
    EPOCHS = 5000


class nnUNetTrainerUNETR_100epochs(nnUNetTrainerUNETR):
    EPOCHS = 100


class nnUNetTrainerUNETR_250epochs(nnUNetTrainerUNETR):
    EPOCHS = 250


class nnUNetTrainerUNETR_500epochs(nnUNetTrainerUNETR):
    EPOCHS = 500


class nnUNetTrainerUNETR_2000epochs(nnUNetTrainerUNETR):
    EPOCHS = 2000


class nnUNetTrainerUNETR_5000epochs(nnUNetTrainerUNETR):
    EPOCHS = 5000


class nnUNetTrainerUNETRPretrainedWeights_100epochs(nnUNetTrainerUNETRPretrainedWeights):
    EPOCHS = 100


class nnUNetTrainerUNETRPretrainedWeights_250epochs(nnUNetTrainerUNETRPretrainedWeights):
    EPOCHS = 250


class nnUNetTrainerUNETRPretrainedWeights_500epochs(nnUNetTrainerUNETRPretrainedWeights):
    EPOCHS = 500


class nnUNetTrainerUNETRPretrainedWeights_2000epochs(nnUNetTrainerUNETRPretrainedWeights):
    EPOCHS = 2000


class nnUNetTrainerUNETRPretrainedWeights_5000epochs(nnUNetTrainerUNETRPretrainedWeights):
    EPOCHS = 5000


class SmokeMixin:
    EPOCHS, ITERATIONS, VAL_ITERATIONS = 2, 10, 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net's exact signature (it inspects it)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune["tta_mirroring"] = False  # validation/prediction in one pass


class nnUNetTrainerHiEndMAE_smoke(SmokeMixin, nnUNetTrainerHiEndMAE):
    pass


class nnUNetTrainerUNETR_smoke(SmokeMixin, nnUNetTrainerUNETR):
    pass


class nnUNetTrainerUNETRPretrainedWeights_smoke(SmokeMixin, nnUNetTrainerUNETRPretrainedWeights):
    pass
