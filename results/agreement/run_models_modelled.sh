#!/bin/bash
# The same models against the simulation that also models the integer pass's int32 biases and
# requantization rounding (--snap_biases --sim_rounding). Needs results/qat_tfslim (run_models.sh).
cd "$(dirname "$0")/../.." || exit 1
run() { tag=$1; shift; echo "=== $tag $(date -u +%H:%M:%S)"; python -m qfsep_jax.intpass.compare "$@" \
  --snap_biases --sim_rounding --locate --reorder_check --float64_check \
  --out results/agreement/${tag}_modelled.json > results/agreement/${tag}_modelled.log 2>&1; echo "rc $? $(date -u +%H:%M:%S)"; }
run qat_tfslim --quantized_model results/qat_tfslim/quantized_model
run per_channel --recipe per_channel
run tf8_zero_variance_fix --recipe tf8_zero_variance_fix
IMN="--label_space imagenette --image_size 128"
run qat_imagenette_original --quantized_model results/qat_imagenette_original_eval/quantized_model $IMN
for v in original qf_relu6 qf_relu qf_relu_l2dw; do
  for seed in 0 1; do
    run figure5_${v}_seed$seed --trained_run results/figure5/$v/seed$seed/train --recipe tf8_per_tensor \
      --calibration_data folder:imagenette/train --calibration_images 500 $IMN
  done
done
