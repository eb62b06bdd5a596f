#!/usr/bin/env bash
# The real-CT evidence run of docs/evidence.md, exactly as run (2 CPU cores). Usage:
#   bash docs/evidence/run_real_ct.sh /work/evidence_run2       # resumable: re-run the same line to continue
# Step 1 (pretraining, both methods, same data/model/steps) is skipped when its final checkpoints exist.
set -euo pipefail
work="${1:?give the work folder}"
here="$(cd "$(dirname "$0")" && pwd)"
data="${DATA:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}"
mkdir -p "$work"/{nnUNet_raw,nnUNet_preprocessed,nnUNet_results,logs,pretrain_scans}
cd "$work"
export nnUNet_raw=$PWD/nnUNet_raw nnUNet_preprocessed=$PWD/nnUNet_preprocessed nnUNet_results=$PWD/nnUNet_results
export nnUNet_compile=f nnUNet_def_n_proc=1 OMP_NUM_THREADS=1

# 1. unlabelled pretraining CTs at 3 mm; both methods at once, one core each
. "$here/pretraining_scans.sh"
import_pretraining_cts 3 32 1
for m in hiend mae; do
  [[ -f pretrain_$m/checkpoint_final.pt ]] && continue
  resume=(); [[ -f pretrain_$m/checkpoint_latest.pt ]] && resume=(--resume)
  /usr/bin/time -f "pretrain $m wall %e s" himae-nnunet pretrain -d 601 -o pretrain_$m --model vit_tiny_p8 \
    --method $m --steps 4000 --crop-size 32 --batch-volumes 2 --crops-per-volume 8 --workers 1 --device cpu \
    --lr 1e-3 --warmup 200 --checkpoint-every 500 --preview-every 0 --no-tensorboard --seed 0 \
    "${resume[@]}" >> logs/pretrain_$m.log 2>&1 &
done
wait

# 2. the labelled data: 4 axial slabs of patient A's abdomen train, patient B tests
[[ -d nnUNet_raw/Dataset520_SlabsAB ]] || himae-nnunet evidence-dataset --data "$data" --dataset-id 520 --slabs 4

# 3. the comparison: scratch, MAE, Hi-End-MAE, nnU-Net; 1 and 3 slabs; 3 draws; frozen and full; two cells at once
/usr/bin/time -f "compare wall %e s" himae-nnunet compare 520 -o compare \
  --pretrained hiend=pretrain_hiend/checkpoint_final.pt --pretrained mae=pretrain_mae/checkpoint_final.pt \
  --shots 1 3 --draws 3 --protocols full frozen --epochs 8 --iterations-per-epoch 12 --val-iterations-per-epoch 1 \
  --patch-size 16 48 48 --feature-size 8 --batch-size 2 --lr 3e-4 --jobs 2 2>&1 | tee -a logs/compare.log
