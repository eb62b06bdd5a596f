#!/usr/bin/env bash
# Hi-End-MAE pretraining of ViT-B/12 (1536) on several nnU-Net datasets, one node with N GPUs.
# Paper settings: 96^3 crops, 24 volumes x 8 crops per step, AdamW 1e-4 (0.9/0.95, wd 0.05), 4k warmup, 400k steps.
# Usage: GPUS=8 DATASETS="501 502 503" bash examples/pretrain_single_node.sh
set -euo pipefail
GPUS=${GPUS:-8}
DATASETS=${DATASETS:-"501"}
OUT=${OUT:-runs/hiend_vit_b12_1536}
: "${nnUNet_raw:?set nnUNet_raw}" "${nnUNet_preprocessed:?set nnUNet_preprocessed}"

ds_args=()
for d in $DATASETS; do ds_args+=(--dataset "$d"); done

# pretraining data (1.5 mm, CT window [-175, 250] -> [0, 1]); existing plans and data are left untouched
himae-nnunet prepare-pretrain "${ds_args[@]}"

# 24 volumes per step in total: 24 / GPUS per GPU (use --accumulate when that is not an integer)
torchrun --standalone --nproc_per_node "$GPUS" -m himae_nnunet.cli pretrain "${ds_args[@]}" \
  --output "$OUT" --model vit_b12_1536 --method hiend --batch-volumes $((24 / GPUS)) --crops-per-volume 8 \
  --steps 400000 --warmup 4000 --lr 1e-4 --checkpoint-every 1000 --workers 8 --log-every 50 \
  $( [ -f "$OUT/checkpoint_latest.pt" ] && echo --resume )
