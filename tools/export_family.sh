#!/bin/bash
# Re-export (export_tflite job, tflite: source) of every member of the MobileNetV1 quantized
# family: widths 0.25/0.5/0.75/1.0 x resolutions 128/160/192/224. Only 0.25/128 ships in
# ../shared/data; the other 15 are built here by TF's legacy uint8 converter with random weights
# (tests/fixtures/synthetic_tflite.build_mobilenet_tflite, the official models' conversion path; they
# end at the logits, the official file with a SOFTMAX, and each re-export keeps its source's end).
# Usage: tools/export_family.sh [N images, default 50]. Run from the repo root.
cd "$(dirname "$0")/../../.." || exit 1
N=${1:-50}
F=results/export_tflite/family
mkdir -p $F/models
for w in 0.25 0.5 0.75 1.0; do
  for r in 128 160 192 224; do
    tag=mobilenet_v1_${w}_${r}
    echo "=== $tag $(date -u +%H:%M:%S)"
    if [ "$w $r" = "0.25 128" ]; then
      src=models/mobilenet_v1_0.25_128_quant.tflite
    else
      src=$PWD/$F/models/$tag.tflite
      [ -f "$src" ] || python -c "from tests.fixtures.synthetic_tflite import build_mobilenet_tflite as b; \
b('$src', width=$w, image_size=$r, num_classes=1001, seed=0)" > $F/models/$tag.build.log 2>&1
    fi
    python launch/main.py --config configs/export_tflite.py --config.source=tflite:$src \
      --config.limit=$N --workdir $F/$tag > $F/$tag.txt 2> $F/$tag.stderr.log
    echo "rc $? $(tail -2 $F/$tag.txt | tr '\n' ' ') $(date -u +%H:%M:%S)"
  done
done
