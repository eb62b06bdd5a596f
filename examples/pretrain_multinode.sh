#!/usr/bin/env bash
# The same pretraining on several nodes: run this script on every node (e.g. from a Slurm array or srun).
# Usage on node R of N: NNODES=4 NODE_RANK=R MASTER=host0:29500 GPUS=8 DATASETS="501 502" bash examples/pretrain_multinode.sh
# Prepare the data once beforehand (himae-nnunet prepare-pretrain --dataset ...), on a shared nnUNet_preprocessed.
set -euo pipefail
NNODES=${NNODES:?number of nodes}
NODE_RANK=${NODE_RANK:?rank of this node, 0..NNODES-1}
MASTER=${MASTER:?host:port of node 0}
GPUS=${GPUS:-8}
DATASETS=${DATASETS:-"501"}
OUT=${OUT:-runs/hiend_vit_b12_1536}   # on a shared file system: rank 0 writes the checkpoints

ds_args=()
for d in $DATASETS; do ds_args+=(--dataset "$d"); done
per_gpu=$(( 24 / (NNODES * GPUS) )); [ "$per_gpu" -ge 1 ] || per_gpu=1

# --max-restarts: a dead rank restarts the whole group, which continues from checkpoint_latest.pt
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" --max-restarts 3 \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER" --rdzv_id himae_pretrain \
  -m himae_nnunet.cli pretrain "${ds_args[@]}" --output "$OUT" --model vit_b12_1536 \
  --batch-volumes "$per_gpu" --crops-per-volume 8 --steps 400000 --warmup 4000 --checkpoint-every 1000 \
  --workers 8 --log-every 50 $( [ -f "$OUT/checkpoint_latest.pt" ] && echo --resume )
