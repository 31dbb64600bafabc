#!/usr/bin/env bash
# Few-label benchmark, the real measurement: profile "gpu" of pretrain/fewlabel_benchmark.py on
# Task04_Hippocampus, sized for ONE run of about 10 minutes on one H100/H200.
#
# On the development machine, once, from the repository root:
#     ../shared/hooks/gpu-kit.sh        # wheels + a copy of Task04_Hippocampus in .gpu-kit/ (git-ignored)
# Then on the GPU machine (device tool: carry [".gpu-kit"], timeout_s 600):
#     . .gpu-kit/activate.sh && bash pretrain/run_gpu_benchmark.sh
# Anywhere else with CUDA, nnunetv2 and this package installed:
#     bash pretrain/run_gpu_benchmark.sh --raw /path/to/Task04_Hippocampus
# Extra arguments go to fewlabel_benchmark.py (e.g. --folds 1, --finetune-epochs 30, --deadline-min 20).
#
# What runs (fewlabel_benchmark.py --profile gpu; all numbers are options):
#   - Task04_Hippocampus (200 cases) -> nnU-Net raw (MSD converter; without SimpleITK, as in the GPU kit,
#     the same conversion with nibabel + NibabelIO), plan + preprocess 2d (plans: 56x40 patches, batch 281);
#   - macl_pretrain --method macl, pcl, simclr: once each, 10 epochs, batch 64 (~1,100 steps), images of all
#     200 cases (no labels), run side by side on the GPU;
#   - nnUNetv2_train with nnUNetTrainerScratch_bench / nnUNetTrainerMACL_bench: 15 epochs x 20 iterations
#     (300 iterations of the plans' batch 281; nnU-Net's default is 250,000), M = 4, 10, 20 labeled cases,
#     4 methods, fold after fold of a 5-fold partition (40 validation cases per fold), 4 runs at a time;
#   - Deadlines: no run starts after 5.5 min, none whose expected length would pass 7.5 min, runs still
#     going at 7.5 min are stopped; the report lists what was cut. Only folds that every method finished
#     enter the table (mean and sd over those folds).
# Estimate (not measured: this repository has had no GPU session yet): preparation ~0.5 min, pretraining
# ~1-2 min (beside the first scratch runs), a training ~1-1.5 min incl. start-up and validation, CPU-bound
# by nnU-Net's augmentation (16 cores shared by 4 runs) -> fold 0 (12 runs) in ~4-5 min, fold 1 partly or
# not at all; the whole command ~8.5-9.5 min including the kit's installation. If fold 0 does not finish,
# rerun with fewer iterations (--iters 10) or budgets (--budgets 4,20).
#
# Results: $WORKDIR/fewlabel/report (table, CSVs, plots, result json) and, when the device tool's $OUT is set, copies
# of the main files there (else in ${WORKDIR}_out) plus fewlabel_report.tar.gz (report, logs, splits).
set -uo pipefail
cd "$(dirname "$0")/.."

RAW=${MACL_GPU_DATA:-.gpu-kit/data/Task04_Hippocampus}
WORKDIR=${FEWLABEL_WORKDIR:-/tmp/fewlabel_gpu}
LIMIT_S=${FEWLABEL_LIMIT_S:-500}   # hard stop of the runner (the device tool's command limit is 600 s)
PY=${PYTHON:-python3}
DEVICE=${FEWLABEL_DEVICE:-cuda}     # cpu: a dry run of this script's plumbing only (use tiny options)
DEST=${OUT:-${WORKDIR}_out}
mkdir -p "$DEST" "$WORKDIR"
DEST=$(cd "$DEST" && pwd)
export nnUNet_compile=${nnUNet_compile:-f} PYTHONUNBUFFERED=1   # compiling 12+ short runs would cost minutes
LOG="$DEST/fewlabel_gpu.log"

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) $(nproc) cores"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  FEWLABEL_DEVICE=$DEVICE "$PY" - <<'PY' || exit 3
import importlib, os, sys
for m in ("torch", "nnunetv2", "nnunetv2_macl", "nibabel", "matplotlib", "sklearn", "blosc2"):
    mod = importlib.import_module(m)
    print(f"{m} {getattr(mod, '__version__', '')}")
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(0 if torch.cuda.is_available() or os.environ["FEWLABEL_DEVICE"] == "cpu" else 1)
PY
} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "environment check failed (see above)" | tee -a "$LOG"; exit 3; }

T0=$(date +%s)
timeout -k 15 "$LIMIT_S" "$PY" pretrain/fewlabel_benchmark.py --profile gpu --raw "$RAW" --workdir "$WORKDIR" \
  --device "$DEVICE" "$@" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
echo "# runner exit status $RC after $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ] || [ ! -f "$WORKDIR/fewlabel/report/fewlabel_result.json" ]; then
  echo "# runner stopped before its report: rebuilding it from the finished runs" | tee -a "$LOG"
  "$PY" pretrain/fewlabel_benchmark.py --workdir "$WORKDIR" --report-only 2>&1 | tee -a "$LOG"
fi

R="$WORKDIR/fewlabel/report"
for f in fewlabel_table.md fewlabel_summary.csv fewlabel_runs.csv fewlabel_result.json fewlabel_dice_vs_M.png; do
  [ -f "$R/$f" ] && [ "$DEST" != "$R" ] && cp "$R/$f" "$DEST/"
done
(cd "$WORKDIR" && tar -czf "$DEST/fewlabel_report.tar.gz" report logs nnUNet_preprocessed/Dataset*/splits_*.json) \
  2>/dev/null || true
ls -la "$DEST"
exit "$RC"
