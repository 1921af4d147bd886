#!/usr/bin/env bash
# The agreement reports behind the README's integer-pass table: every quantized model of the
# project against the plain simulation and against the simulation aligned with the integer
# arithmetic (int32 biases + TFLite's rounding). About 4 minutes per report at 224 px with all
# checks on 2 CPU cores.
# Needs the QAT exports (configs/qat_tfslim.py, configs/qat_imagenette.py:original) and the
# Figure 5 training runs (configs/figure5.py) under results/; their checkpoints are not tracked.
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/agreement
report() {  # tag, then config overrides
  local tag=$1; shift
  for aligned in False True; do
    local name=$tag; [ "$aligned" = True ] && name=${tag}_modelled
    echo "=== $name $(date -u +%H:%M:%S)"
    python launch/main.py --config configs/agreement.py --workdir "$out/$name" \
      --config.snap_biases=$aligned --config.sim_rounding=$aligned "$@"
  done
}
report qat_tfslim --config.source=quantized:results/qat_tfslim/quantized_model
report per_channel --config.recipe=per_channel
# The committed tf8_zero_variance_fix reports ran with the fix on all BN layers (they record no
# zero_variance_scope; the summary names them tf8_zero_variance_fix_all); this reruns the
# paper's depthwise fix.
report tf8_zero_variance_fix --config.recipe=tf8_zero_variance_fix
report qat_imagenette_original \
  --config.source=quantized:results/qat_imagenette_original_eval/quantized_model
for v in original qf_relu6 qf_relu qf_relu_l2dw; do
  for seed in 0 1; do
    report "figure5_${v}_seed$seed" --config.source="trained:results/figure5/$v/seed$seed/train" \
      --config.recipe=tf8_per_tensor --config.calibration_data=folder:imagenette/train \
      --config.num_calibration_images=500
  done
done
python launch/main.py --config configs/agreement.py:summary --workdir "$out"
