#!/usr/bin/env bash
# The low-label comparison at full scale on one GPU: ViT-B/12 (1536) at 1.5 mm with 96^3 crops, Hi-End-MAE and
# MAE pretrained on the unlabelled real CTs (or the authors' released weights, imported, when AUTHORS_CKPT names
# their file), then `himae-nnunet compare` with the paper's one-shot fine-tuning amount (5000 passes x 4 crops
# = 20000 crops: 40 epochs x 250 iterations x batch 2) for scratch / MAE / Hi-End-MAE / nnU-Net, 1 and 3 slabs of
# patient A, 3 draws, full and frozen protocols, test on patient B.
#
# Needs: a CUDA machine with this package and nnunetv2 2.8.x installed (pip install -e .), ../shared/data.
# Everything resumes (pretraining with --resume, compare by cells), so a run cut by a time limit continues
# when the same command is run again on the same disk. It does NOT fit one 10-minute call of a bare, fresh
# machine: pretraining alone is STEPS x ~0.1 s, and each of the 42 cells trains 10000 iterations (~15 min on an
# H100 for the UNETR). Split it over calls only where the work folder persists between them; with STEPS=200,
# EPOCHS=2, ITERATIONS=50 it is a ~10-minute smoke run of the same path.
#
#   bash benchmarks/gpu/compare_full_scale.sh /data/compare_full
#   STEPS=200 EPOCHS=2 ITERATIONS=50 bash benchmarks/gpu/compare_full_scale.sh $OUT/smoke
set -euo pipefail
work="${1:?give the work folder}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
data="${DATA:-$repo/../shared/data}"
steps="${STEPS:-20000}"
mkdir -p "$work"/{nnUNet_raw,nnUNet_preprocessed,nnUNet_results,logs,pretrain_scans}
cd "$work"
export nnUNet_raw=$PWD/nnUNet_raw nnUNet_preprocessed=$PWD/nnUNet_preprocessed nnUNet_results=$PWD/nnUNet_results
nvidia-smi > logs/nvidia-smi.txt 2>&1 || true

. "$repo/docs/evidence/pretraining_scans.sh"
import_pretraining_cts 1.5 96 8
arms=()
for m in hiend mae; do
  resume=(); [[ -f pretrain_$m/checkpoint_latest.pt ]] && resume=(--resume)
  [[ -f pretrain_$m/checkpoint_final.pt ]] || himae-nnunet pretrain -d 601 -o pretrain_$m --model vit_b12_1536 \
    --method $m --steps "$steps" --crop-size 96 --batch-volumes 4 --crops-per-volume 8 --workers 8 --device cuda \
    --checkpoint-every 500 "${resume[@]}" 2>&1 | tee -a logs/pretrain_$m.log
  arms+=(--pretrained "$m=pretrain_$m/checkpoint_final.pt")
done
if [[ -n "${AUTHORS_CKPT:-}" ]]; then  # the authors' released ViT-B/12 weights, converted once
  [[ -f authors.pt ]] || himae-nnunet import-official "$AUTHORS_CKPT" authors.pt
  arms+=(--pretrained "authors=authors.pt")
fi
[[ -d nnUNet_raw/Dataset520_SlabsAB ]] || himae-nnunet evidence-dataset --data "$data" --dataset-id 520 --slabs 4
himae-nnunet compare 520 -o compare "${arms[@]}" --shots 1 3 --draws 3 --protocols full frozen \
  --epochs "${EPOCHS:-40}" --iterations-per-epoch "${ITERATIONS:-250}" --val-iterations-per-epoch 10 \
  --patch-size 48 96 96 --feature-size 32 --batch-size 2 --lr 1e-4 --tta-mirroring --device cuda \
  -np 8 2>&1 | tee -a logs/compare.log
cp compare/report.md compare/*.csv compare/*.json compare/dice_vs_budget.png "${OUT:-.}/" 2>/dev/null || true
