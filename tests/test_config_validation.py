"""Config validation before any work, and the restart check of a training run.

A bad value is one line on stderr naming the field, within seconds, and leaves no workdir; an
override of a field the config does not have likewise. The commands run ``launch/main.py`` as a
user would (a subprocess each, about 1.5 s: validation imports no TensorFlow).
"""

import importlib
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, require

from configs import figure5 as figure5_configs
from configs import smoke
from qfsep_jax import config_validation as cv
from qfsep_jax.jobs import figure5 as figure5_job

# (config file, override, the field the error must name): the list of bad values.
BAD_VALUES = [
    ("smoke.py", "--config.total_steps=0", "config.total_steps=0"),
    ("smoke.py", "--config.model.width_multiplier=0", "config.model.width_multiplier=0.0"),
    ("smoke.py", "--config.batch_size=-16", "config.batch_size=-16"),
    ("smoke.py", "--config.eval_limit=0", "config.eval_limit=0"),
    ("smoke.py", "--config.image_size=0", "config.image_size=0"),
    ("smoke.py", "--config.nonexistent=1", "--config.nonexistent=1"),
    ("tflite_check.py", "--config.limit=-1", "config.limit=-1"),
    ("tflite_check.py", "--config.limit=-2", "config.limit=-2"),
    ("reproduce_table1.py", "--config.rows=()", "config.rows=()"),
    ("reproduce_table1.py", "--config.observer=bogus", "config.observer='bogus'"),
    ("reproduce_table1.py", "--config.image_size=0", "config.image_size=0"),
]


def _main(config_file, workdir, *args):
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "main.py"),
        "--config",
        os.path.join(REPO, "configs", config_file),
        "--workdir",
        str(workdir),
        f"--config.data_dir={require('.')}",
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("config_file,override,field", BAD_VALUES)
def test_bad_value_is_one_line_in_seconds_and_writes_nothing(
    tmp_path, config_file, override, field
):
    workdir = tmp_path / "run"
    proc, seconds = _main(config_file, workdir, override)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), proc.stderr[-2000:]
    assert seconds < 30, seconds
    assert not workdir.exists()


def test_traceback_only_with_verbosity(tmp_path):
    proc, _ = _main("smoke.py", tmp_path / "run", "--config.total_steps=0", "--verbosity=1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ConfigError: config.total_steps=0" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_every_shipped_config_validates(tmp_path):
    data_dir = require(".")
    names = sorted(
        f[:-3]
        for f in os.listdir(os.path.join(REPO, "configs"))
        if f.endswith(".py") and f[:-3] not in ("__init__", "base", "train_base")
    )
    assert {
        "smoke",
        "reproduce_table1",
        "tflite_check",
        "analyze_official",
        "figure5",
        "agreement",
    } <= set(names)
    for name in names:
        config = importlib.import_module(f"configs.{name}").get_config()
        config.data_dir = data_dir
        if config.job == "export_tflite":
            config.source = "ptq:tf8_per_tensor"  # the one field without a default
        if config.job == "train" and config.init_from.startswith("checkpoint:"):
            config.init_from = f"checkpoint:{tmp_path}"  # a float run's workdir, made later
        cv.validate(config)
    # Every Figure 5 recipe, with each variant's training config under its overrides.
    for recipe in figure5_configs.RECIPES:
        config = figure5_configs.get_config(recipe)
        config.data_dir = data_dir
        figure5_job.validate(config)


def test_validation_names_field_value_and_what_is_allowed(data_dir):
    c = smoke.get_config()
    c.data_dir = data_dir
    cv.validate(c)
    cases = {
        "model.block": (
            "fancy",
            "config.model.block='fancy': must be one of ('original', 'qf', 'original_linear_dw', "
            "'original_nobn_dw')",
        ),
        "optimizer": ("adamw", "config.optimizer='adamw': must be one of"),
        "crop_area_range": ((0.5, 0.2), "config.crop_area_range=(0.5, 0.2): must be two numbers"),
        "eval_data": ("folder:no/such", "config.eval_data='folder:no/such': no such image folder"),
        "train_data": ("imagenette", "config.train_data='imagenette': must be 'folder:<path"),
        "init_from": ("tfslim", "config.init_from='tfslim': must be '', 'checkpoint:<path>'"),
        "dropout_rate": (1.0, "config.dropout_rate=1.0: must be a finite number in [0, 1)"),
        "qat.bn_freeze_step": (-2, "config.qat.bn_freeze_step=-2: must be an integer >= -1"),
        "halt_after_steps": (0, "config.halt_after_steps=0: must be an integer >= 1, or None"),
    }
    for field, (value, message) in cases.items():
        bad = smoke.get_config()
        bad.data_dir = data_dir
        *parents, leaf = field.split(".")
        node = bad
        for p in parents:
            node = node[p]
        with bad.unlocked():
            node[leaf] = value
        with pytest.raises(cv.ConfigError) as info:
            cv.validate(bad)
        assert str(info.value).startswith(message), str(info.value)
    bad = smoke.get_config()
    bad.data_dir = str(data_dir) + "/missing"
    with pytest.raises(cv.ConfigError, match="config.data_dir=.*no such directory"):
        cv.validate(bad)


# ----------------------------------------------------------------------------------------------
# Restarts: every field is either refused or recorded.


def _changed(value):
    """Some other valid-looking value of the same kind."""
    if isinstance(value, bool):
        return not value
    if value is None:
        return 1
    if isinstance(value, int | float):
        return value + 1 if value in (0, -1) else value * 2
    if isinstance(value, str):
        return value + "x"
    return [v * 0.5 for v in value]


def test_restart_refuses_every_result_field_and_records_the_others(tmp_path):
    config = smoke.get_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    assert cv.restart_changes(str(tmp_path), config) == {}
    fields = cv.flatten(cv.config_as_json(config))
    neutral = []
    for field, value in fields.items():
        changed = smoke.get_config()
        *parents, leaf = field.split(".")
        node = changed
        for p in parents:
            node = node[p]
        with changed.unlocked():
            node[leaf] = True if field == "half_precision" else _changed(value)
        if cv.restart_neutral(field, "constant"):
            changes = cv.restart_changes(str(tmp_path), changed)
            assert list(changes) == [field], (field, changes)
            neutral.append(field)
        else:
            with pytest.raises(cv.ConfigError, match=f"config.{field}: "):
                cv.restart_changes(str(tmp_path), changed)
    # The ones the issue names are refused; extending a run is not.
    for field in ("learning_rate", "batch_size", "model.width_multiplier", "dropout_rate"):
        assert field not in neutral
    assert "total_steps" in neutral and "eval_limit" in neutral
    cosine = smoke.get_config()
    cosine.lr_schedule = "cosine"
    (tmp_path / "config.json").write_text(cosine.to_json_best_effort(indent=2))
    cosine.total_steps = 8  # the cosine schedule's length: changes every step's learning rate
    with pytest.raises(cv.ConfigError, match="config.total_steps: 4 -> 8"):
        cv.restart_changes(str(tmp_path), cosine)


def test_restart_history_records_each_change_against_the_previous_segment(tmp_path):
    config = smoke.get_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    config.eval_limit = 8
    cv.record_restart(str(tmp_path), 2, cv.restart_changes(str(tmp_path), config))
    config.log_every_steps = 5
    cv.record_restart(str(tmp_path), 4, cv.restart_changes(str(tmp_path), config))
    history = json.loads((tmp_path / cv.HISTORY_FILE).read_text())
    assert [h["start_step"] for h in history] == [2, 4]
    assert history[0]["changes"] == {"eval_limit": [32, 8]}
    assert history[1]["changes"] == {"log_every_steps": [1, 5]}  # eval_limit: already recorded
    assert cv.restart_changes(str(tmp_path), config) == {}
    os.remove(tmp_path / "config.json")
    with pytest.raises(cv.ConfigError, match="no config.json"):
        cv.restart_changes(str(tmp_path), config)


def test_restart_of_a_run_recorded_without_the_qat_bit_widths(tmp_path):
    config = smoke.get_config()
    recorded = json.loads(config.to_json_best_effort())
    del recorded["qat"]["weight_bits"], recorded["qat"]["act_bits"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    assert cv.restart_changes(str(tmp_path), config) == {}  # it ran at 8 bits
    config.qat.weight_bits = 4
    with pytest.raises(cv.ConfigError, match="config.qat.weight_bits: 8 -> 4"):
        cv.restart_changes(str(tmp_path), config)
