"""The training commands: create-configs, and settings that would not apply (errors before any work)."""

import os

from tests.runs import cli


def test_create_configs_round_trip(tmp_path, pretrain_data):
    cli("create-configs", "--output_dir", str(tmp_path))
    from llada_jax.config import load_config

    pre = load_config(str(tmp_path / "pretraining_config.json"), task="pretrain")
    sft = load_config(str(tmp_path / "sft_config.json"), task="sft")
    assert (pre.learning_rate, pre.batch_size, pre.gradient_accumulation_steps) == (5e-4, 8, 8)
    assert (sft.learning_rate, sft.batch_size, sft.gradient_accumulation_steps) == (1e-5, 4, 16)
    assert pre.model.d_model == 4096 and pre.model.mask_token_id == 126336


def test_a_lora_setting_without_lora_enabled_is_an_error_that_writes_nothing(tmp_path):
    """Issue 28: `sft --config.lora.rank=8` without `--config.lora.enabled=true` trained the whole model. A LoRA
    option given while LoRA is off (a value other than the default, or any value named on the command line) is
    one line naming lora.enabled, exit 2, before anything is written."""
    import json

    from flax import nnx

    from llada_jax import LLaDAConfig, LLaDAForMaskedLM
    from tests.runs import ROOT

    base = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0)).save_pretrained(str(tmp_path / "base"))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"input_ids": [509, 5, 6, 7, 8, 510], "prompt_length": 3}) + "\n")
    out = tmp_path / "never"
    # rank at its default but named on the command line, alpha changed: both are named
    proc = cli("sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.py"), "--model_name_or_path", base,
               "--data_path", str(data), "--output_dir", str(out), "--max_steps", "1", "--batch_size", "8",
               "--max_length", "16", "--config.checkpoint.async_save=false", "--config.lora.rank=16",
               "--config.lora.alpha=64", check=False, devices=1)
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error.startswith("llada-jax sft: error: lora.rank, lora.alpha are set, but lora.enabled is false"), error
    assert not out.exists()


def test_compile_check_refuses_a_lora_setting_without_lora_enabled(monkeypatch, capsys):
    from llada_jax.cli import main
    from tests.runs import ROOT

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # compile-check appends to it: restored after
    assert main(["compile-check", "--config", os.path.join(ROOT, "configs", "tiny_sft.py"), "--num_devices", "1",
                 "--config.lora.dropout=0.1"]) == 2
    assert "lora.dropout is set, but lora.enabled is false" in capsys.readouterr().err
