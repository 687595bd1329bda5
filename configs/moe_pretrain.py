"""Pretraining-sized runs of the Mixture-of-Experts presets (LLaDA 2.x, LLaDA-MoE): for sizing with compile-check,
and a start for a run.

    llada-jax compile-check --config configs/moe_pretrain.py --num_devices 16 \
        --config.mesh.fsdp=4 --config.mesh.expert=4                                 # LLaDA2.0-mini
    llada-jax compile-check --config configs/moe_pretrain.py:llada2_flash --num_devices 64 \
        --config.mesh.fsdp=8 --config.mesh.expert=8

The argument picks the preset: llada2_mini (the default), llada2_flash or llada_moe_7b (see docs/moe.md; the LLaDA
2.x ones are block-causal, blocks of 32). bf16 compute over fp32 masters, layers scanned and rematerialised,
sequences of 4096. The other settings are train_config's (the LLaDA-8B pretraining recipe), not a published
LLaDA 2.x recipe. Put devices on `mesh.expert` (it must divide the experts) to split the experts over them.
"""

from llada_jax.config import LLaDAConfig, train_config


def get_config(preset: str = "llada2_mini"):
    model = LLaDAConfig.preset(preset, dtype="bfloat16", remat_policy="save_dots_no_batch")
    if not model.is_moe:
        raise ValueError(f"configs/moe_pretrain.py: {preset!r} is not a Mixture-of-Experts preset")
    c = train_config(model, task="pretrain")
    c.max_length = 4096
    return c
