#!/bin/bash
# How runs/bf16_smoke was made (2026-12-03 17:34-17:48 UTC, Intel Xeon, 2 cores shared with other jobs, CPU only).
# Three 300-step runs of configs/smoke.py at learning rate 0.05, the same seed and data:
# float32, bfloat16 (half_precision=True), and float32 on 2 devices (a control: the same
# float32 run with another reduction order, i.e. float32 rounding only).
set -e
R=/tmp/bf16_smoke/final
COMMON="--config configs/smoke.py --config.total_steps=300 --config.learning_rate=0.05"
python launch/main.py $COMMON --workdir $R/f32 --config.half_precision=False
python launch/main.py $COMMON --workdir $R/bf16 --config.half_precision=True
XLA_FLAGS=--xla_force_host_platform_device_count=2 python launch/main.py $COMMON \
  --workdir $R/f32_2dev --config.half_precision=False --config.num_devices=2
python tools/compare_loss_curves.py --runs f32=$R/f32,bf16=$R/bf16,f32_2dev=$R/f32_2dev \
  --reference f32 --out runs/bf16_smoke \
  --title "smoke config (MobileNetV1 0.25, 32 px, batch 16), lr 0.05, 300 steps"
