"""Supervised fine-tuning of the tiny preset (tests, the demo, smoke runs).

    llada-jax sft --config configs/tiny_sft.py --model_name_or_path runs/tiny --data_path SFT_DATA ...
    llada-jax sft --config configs/tiny_sft.py:tiny_moe ...   # the tiny Mixture-of-Experts model
"""

from llada_jax.config import LLaDAConfig, sft_defaults, train_config


def get_config(preset: str = "tiny"):
    c = sft_defaults(train_config(LLaDAConfig.preset(preset), task="sft"))
    c.max_length = 128
    c.batch_size = 8
    c.gradient_accumulation_steps = 1
    c.learning_rate = 1e-4
    c.max_steps = 200
    c.warmup_steps = 20
    c.save_steps = 100
    c.logging_steps = 10
    return c
