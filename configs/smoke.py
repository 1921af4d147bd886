"""Smoke training run: a few steps on real Imagenette images at 32 px, width 0.25.

Command:

    python launch/main.py --config configs/smoke.py --workdir /tmp/smoke

Trains MobileNetV1 0.25 (original block, stem stride 1 for 32 px inputs) for ``total_steps`` steps
of 16 images from ``../shared/data/imagenette/train``, logs every step to
``/tmp/smoke/metrics.jsonl``, checkpoints at the end and evaluates on the first 32 validation
images. ``--config.qat.enabled=True`` makes it a QAT smoke run. Expected: about a minute on the
2-core CPU machine (most of it compilation), loss near ln(10) = 2.3, top-1 near chance.
The tests (tests/test_train*.py, tests/test_multihost.py) build on this config.
"""

import ml_collections

from configs import train_base


def get_config() -> ml_collections.ConfigDict:
    c = train_base.get_config()
    c.image_size = 32
    c.crop_area_range = (0.25, 1.0)
    c.batch_size = 16
    c.eval_batch_size = 16
    c.eval_limit = 32
    c.model.width_multiplier = 0.25
    c.model.stem_stride = 1
    # XLA's grouped conv: compiles twice as fast as the CPU 'shift' impl, which only pays off
    # over many steps; the whole smoke run takes as long with 'native' (18.3 s vs 18.7 s, one).
    c.model.depthwise_impl = "lax"
    c.dropout_rate = 0.0
    c.optimizer = "momentum"
    c.learning_rate = 0.01
    c.lr_schedule = "constant"
    c.total_steps = 4
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2
    c.async_checkpoints = False
    return c
