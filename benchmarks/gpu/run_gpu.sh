#!/usr/bin/env bash
# The GPU benchmarks in one command, on a bare GPU machine (Python 3.12 + torch + timm + scipy; no nnunetv2,
# no network). Installs this checkout (without dependencies: `pretrain/` and `trainers/` only import as
# himae_nnunet.pretrain / .trainers once installed) and the carried wheels of gpu_carry/ (see
# benchmarks/gpu/README.md) into a private folder, then runs benchmarks/run.py: pretraining model speed / MFU per preset (+ torch.compile for
# vit_b12_1536) and fine-tuning speed (UNETR vs nnU-Net's PlainConvUNet); then benchmarks/vs_authors.py
# (one pretraining step, ours vs the authors' code, vit_b12_1536 at batch 24 x 8 or the largest that fits)
# when their code is there: --authors-code DIR, else $AUTHORS_CODE, else gpu_carry/Hi-End-MAE (a clone of
# github.com/FengheTan9/Hi-End-MAE, carried like the wheels; never committed). The loader part (CPU-bound, needs
# the real CTs) is not run here: `python benchmarks/run.py` measures it on any machine with ../shared/data.
# Results: OUT_DIR/benchmark_results.json, run_log.txt, nvidia-smi.txt (OUT_DIR: --out, else $OUT, else
# runs/benchmarks_gpu). About 3-5 minutes on one H100/H200; stopped at 7.5 minutes (partial results kept).
#
#   bash benchmarks/gpu/run_gpu.sh                          # on the GPU machine, from the repository root
#   bash benchmarks/gpu/run_gpu.sh --device cpu --quick     # dry run of the same path on a CPU
set -euo pipefail

cd "$(dirname "$0")/../.."
device=cuda
out_dir="${OUT:-runs/benchmarks_gpu}"
authors="${AUTHORS_CODE:-gpu_carry/Hi-End-MAE}"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --out) out_dir="$2"; shift 2 ;;
    --authors-code) authors="$2"; shift 2 ;;
    --quick) extra+=(--quick); shift ;;
    *) extra+=("$1"); shift ;;  # passed on to run.py
  esac
done
py="${PYTHON:-python3}"
limit_s="${BENCH_LIMIT_S:-330}"  # run.py; vs_authors gets VS_AUTHORS_LIMIT_S: under 8 minutes in all
authors_limit_s="${VS_AUTHORS_LIMIT_S:-120}"
site="${BENCH_SITE:-/tmp/himae_bench_site}"
mkdir -p "$out_dir"
log="$out_dir/run_log.txt"

# the checkout itself, offline: no dependencies, no build isolation (uses the machine's setuptools)
if ! "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$site" . > "$out_dir/pip_install.txt" 2>&1; then
  echo "installing the checkout failed (needs pip and setuptools):" | tee "$log"
  tail -5 "$out_dir/pip_install.txt" | tee -a "$log"
  exit 1
fi
echo "installed the checkout into $site" | tee "$log"

shopt -s nullglob
wheels=(gpu_carry/*.whl)
if [[ ${#wheels[@]} -gt 0 ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  echo "installed ${#wheels[@]} carried wheels into $site" | tee -a "$log"
else
  echo "no gpu_carry/*.whl: the fine-tuning part needs dynamic_network_architectures and nnunetv2" | tee -a "$log"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 nnUNet_compile=f
# the installed package imports without nnunetv2/SimpleITK where the GPU parts need it
(cd /tmp && "$py" -c "import himae_nnunet.models, himae_nnunet.models.flops; print('himae_nnunet from', \
  himae_nnunet.__file__)") 2>&1 | tee -a "$log"

if [[ "$device" == cuda ]]; then
  nvidia-smi > "$out_dir/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" | tee -a "$log"
fi
status=0
timeout --signal=INT --kill-after=20 "$limit_s" \
  "$py" benchmarks/run.py --device "$device" --out "$out_dir" --parts finetune model "${extra[@]}" \
  2>&1 | tee -a "$log" || status=$?
echo "run.py exit status $status; results in $out_dir" | tee -a "$log"

if [[ -f "$authors/hi_end_mae.py" ]]; then
  vs=(--authors-code "$authors" --device "$device" --configs vit_b12_1536)
  [[ " ${extra[*]} " == *" --quick "* ]] && vs+=(--configs vit_b16_768 --batch 2 --steps 1 --warmup 0)
  timeout --signal=INT --kill-after=20 "$authors_limit_s" "$py" benchmarks/vs_authors.py "${vs[@]}" \
    2>&1 | tee "$out_dir/vs_authors.txt" | tee -a "$log" || echo "vs_authors.py stopped (exit $?)" | tee -a "$log"
else
  echo "vs_authors skipped: no authors' code at $authors (--authors-code DIR)" | tee -a "$log"
fi
exit "$status"
