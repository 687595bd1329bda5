"""The training commands: create-configs."""

from tests.runs import cli


def test_create_configs_round_trip(tmp_path, pretrain_data):
    cli("create-configs", "--output_dir", str(tmp_path))
    from llada_jax.config import load_config

    pre = load_config(str(tmp_path / "pretraining_config.json"), task="pretrain")
    sft = load_config(str(tmp_path / "sft_config.json"), task="sft")
    assert (pre.learning_rate, pre.batch_size, pre.gradient_accumulation_steps) == (5e-4, 8, 8)
    assert (sft.learning_rate, sft.batch_size, sft.gradient_accumulation_steps) == (1e-5, 4, 16)
    assert pre.model.d_model == 4096 and pre.model.mask_token_id == 126336
