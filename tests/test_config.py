"""Experiment files, seed-style JSON configs and --config overrides."""

import json
import os

import pytest

from llada_jax.config import (
    LLaDAConfig,
    apply_overrides,
    load_config,
    model_config_from,
)

ROOT = os.path.dirname(os.path.dirname(__file__))


def config_path(name):
    return os.path.join(ROOT, "configs", name)


def test_8b_pretrain_config_holds_the_original_recipe():
    c = load_config(config_path("llada_8b_pretrain.py"), task="pretrain")
    assert (c.learning_rate, c.batch_size, c.gradient_accumulation_steps, c.max_steps, c.warmup_steps,
            c.max_length, c.eps, c.random_length_prob) == (5e-4, 8, 8, 100000, 2000, 4096, 1e-3, 0.01)
    model = model_config_from(c)
    assert model.mask_token_id == 126336 and model.padded_vocab_size == 126464
    assert model.replace(dtype="float32", remat_policy="none") == LLaDAConfig.llada_8b()


def test_8b_sft_config_holds_the_original_recipe():
    c = load_config(config_path("llada_8b_sft.py"), task="sft")
    assert c.task == "sft"
    assert (c.learning_rate, c.batch_size, c.gradient_accumulation_steps, c.max_steps, c.warmup_steps) == (
        1e-5, 4, 16, 10000, 500)


@pytest.mark.parametrize("name,task", [("tiny_pretrain.py", "pretrain"), ("tiny_sft.py", "sft")])
def test_tiny_configs_load(name, task):
    c = load_config(config_path(name), task=task)
    assert model_config_from(c) == LLaDAConfig.tiny()


def test_config_task_mismatch_is_an_error():
    with pytest.raises(ValueError, match="'sft' config"):
        load_config(config_path("tiny_sft.py"), task="pretrain")


def test_overrides_are_typed():
    c = load_config(config_path("tiny_pretrain.py"))
    apply_overrides(c, ["--config.learning_rate=3e-4", "--config.model.n_layers=4", "--config.data.shuffle=false",
                        "--config.model.embedding_size=640", "--config.lr_scheduler_type=wsd"])
    assert c.learning_rate == 3e-4 and c.model.n_layers == 4 and c.data.shuffle is False
    assert c.model.embedding_size == 640 and c.lr_scheduler_type == "wsd"
    with pytest.raises(ValueError, match="unknown config key 'learning_rat'"):
        apply_overrides(c, ["--config.learning_rat=1"])
    with pytest.raises(ValueError, match="cannot parse"):
        apply_overrides(c, ["--config.max_steps=ten"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(c, ["--config.max_steps='ten'"])


def test_seed_style_json(tmp_path):
    path = tmp_path / "pretraining_config.json"
    path.write_text(json.dumps({
        "pretraining": {"output_dir": "./out", "data_path": "./data", "learning_rate": 5e-4, "batch_size": 8,
                        "gradient_accumulation_steps": 8, "max_steps": 100000, "warmup_steps": 2000,
                        "max_length": 4096, "mask_token_id": 126336, "eps": 1e-3, "random_length_prob": 0.01},
        "sft": {"learning_rate": 1e-5, "batch_size": 4},
    }))
    c = load_config(str(path), task="pretrain")
    assert c.data_path == "./data" and c.model.mask_token_id == 126336 and c.max_length == 4096
    s = load_config(str(path), task="sft")
    assert s.task == "sft" and s.learning_rate == 1e-5 and s.gradient_accumulation_steps == 16


def test_json_errors_name_the_key_and_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"pretraining": {"learning_rte": 1.0}}))
    with pytest.raises(ValueError, match=r"bad.json: unknown config key 'learning_rte'"):
        load_config(str(path), task="pretrain")
    path.write_text('{"pretraining": {"batch_size": 8,}}')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 1"):
        load_config(str(path), task="pretrain")
    path.write_text(json.dumps({"pretraining": {"batch_size": "eight"}}))
    with pytest.raises(ValueError, match=r"batch_size: expected int"):
        load_config(str(path), task="pretrain")


def test_the_llada2_continued_pretraining_schedule(tmp_path):
    """The LLaDA 2.0 report's block sizes in order (warm-up 1 -> 4 -> 32 -> 64 -> the sequence, stable, decay to
    32), at steps that scale with the run's length, and a config the training checks accept."""
    from llada_jax.train.loop import validate

    for arg, steps in (("llada2_mini", 100_000), ("llada2_flash,20000", 20_000)):
        c = load_config(config_path("llada2_continued_pretrain.py") + ":" + arg)
        schedule = [tuple(e) for e in c.block_diffusion.block_size_schedule]
        assert [size for _, size in schedule] == [1, 4, 32, 64, 4096, 32]
        assert [s for s, _ in schedule] == sorted(s for s, _ in schedule) and schedule[0][0] == 0
        assert c.max_steps == steps and 0.8 * steps < schedule[-1][0] < steps
        assert c.model.block_size == 32 and c.max_length == 4096
        (tmp_path / "corpus.jsonl").write_text('{"input_ids": [1, 2]}\n')
        c.data_path, c.output_dir = str(tmp_path / "corpus.jsonl"), str(tmp_path / "out")
        assert validate(c).num_experts == 256


def test_a_schedule_step_past_max_steps_is_an_error(tmp_path):
    from llada_jax.errors import ConfigError
    from llada_jax.train.loop import validate

    c = load_config(config_path("llada2_continued_pretrain.py"))
    (tmp_path / "corpus.jsonl").write_text('{"input_ids": [1, 2]}\n')
    c.data_path, c.output_dir, c.max_steps = str(tmp_path / "corpus.jsonl"), str(tmp_path / "out"), 1000
    with pytest.raises(ConfigError, match="block_size_schedule: step 2000 is never reached \\(max_steps is 1000\\)"):
        validate(c)
