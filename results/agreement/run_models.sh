#!/bin/bash
# Integer pass vs the plain fake-quant simulation on our own quantized models (one report each).
# Trains results/qat_tfslim first (about 7 min on 2 cores). Run from anywhere; works in the repo root.
cd "$(dirname "$0")/../.." || exit 1
run() { tag=$1; shift; echo "=== $tag $(date -u +%H:%M:%S)"; python -m qfsep_jax.intpass.compare "$@" \
  --out results/agreement/$tag.json > results/agreement/$tag.log 2>&1; echo "rc $? $(date -u +%H:%M:%S)"; }
echo "=== train qat_tfslim $(date -u +%H:%M:%S)"
python launch/main.py --config configs/qat_tfslim.py --workdir results/qat_tfslim > results/qat_tfslim.log 2>&1
echo "rc $? $(date -u +%H:%M:%S)"
run qat_tfslim --quantized_model results/qat_tfslim/quantized_model --locate --reorder_check --float64_check
run per_channel --recipe per_channel --locate --reorder_check --float64_check
run tf8_zero_variance_fix --recipe tf8_zero_variance_fix --locate --reorder_check --float64_check
IMN="--label_space imagenette --image_size 128"
run qat_imagenette_original --quantized_model results/qat_imagenette_original_eval/quantized_model $IMN --locate --reorder_check --float64_check
for v in original qf_relu6 qf_relu qf_relu_l2dw; do
  for seed in 0 1; do
    run figure5_${v}_seed$seed --trained_run results/figure5/$v/seed$seed/train --recipe tf8_per_tensor \
      --calibration_data folder:imagenette/train --calibration_images 500 $IMN --locate --reorder_check --float64_check
  done
done
