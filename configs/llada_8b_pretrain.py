"""LLaDA-8B pretraining with the original recipe.

lr 5e-4, 8 sequences x 8 accumulation steps per update, 100k steps, 2k warmup, length 4096, eps 1e-3, and 1% of
batches cut to a random length. bf16 compute over fp32 master weights, layers scanned and rematerialised,
parameters and optimizer state sharded over the fsdp axis (all devices by default). batch_size is global and must
divide over the devices: keep 64 sequences per update with batch_size x gradient_accumulation_steps, e.g.
--config.batch_size=64 --config.gradient_accumulation_steps=1 on 32 devices.
"""

from llada_jax.config import LLaDAConfig, train_config


def get_config():
    c = train_config(LLaDAConfig.llada_8b(dtype="bfloat16", remat_policy="save_dots_no_batch"), task="pretrain")
    # The recipe's values, restated so this file reads as the recipe.
    c.learning_rate = 5e-4
    c.batch_size = 8
    c.gradient_accumulation_steps = 8
    c.max_steps = 100000
    c.warmup_steps = 2000
    c.max_length = 4096
    c.eps = 1e-3
    c.random_length_prob = 0.01
    c.model.mask_token_id = 126336
    c.save_steps = 1000
    return c
