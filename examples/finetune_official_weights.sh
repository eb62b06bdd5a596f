#!/usr/bin/env bash
# Fine-tune from the authors' released 10k-CT Hi-End-MAE weights (ViT-B/12, 1536) on your nnU-Net dataset.
# Usage: OFFICIAL=/path/to/their_checkpoint.pth DATASET=990 FOLD=0 bash examples/finetune_official_weights.sh
set -euo pipefail
OFFICIAL=${OFFICIAL:?path to the released .pth file}
DATASET=${DATASET:?nnU-Net dataset id}
FOLD=${FOLD:-0}
TRAINER=${TRAINER:-nnUNetTrainerHiEndMAE_1000epochs}   # paper: 5000 one-shot / 1 %, 2000 for 10 %, 1000 for 100 %
export nnUNet_extTrainer=$(himae-nnunet ext-trainer-path)

mkdir -p runs
[ -f runs/official_vit_b12_1536.pt ] || himae-nnunet import-official "$OFFICIAL" runs/official_vit_b12_1536.pt
[ -f "$nnUNet_preprocessed/$(ls "$nnUNet_raw" | grep "^Dataset$(printf %03d "$DATASET")_")/nnUNetPlans.json" ] \
  || nnUNetv2_plan_and_preprocess -d "$DATASET" -c 3d_fullres
himae-nnunet plan "$DATASET" --checkpoint runs/official_vit_b12_1536.pt --preprocess --overwrite
# optional few-shot fold: himae-nnunet split "$DATASET" --shots 1   (prints the new fold's index)
nnUNetv2_train "$DATASET" 3d_fullres "$FOLD" -tr "$TRAINER" -p HiEndMAEPlans
