"""Pretrain the tiny preset: a few seconds per step on a CPU (tests, the demo, smoke runs).

    llada-jax pretrain --config configs/tiny_pretrain.py --data_path DATA --output_dir runs/tiny
    llada-jax pretrain --config configs/tiny_pretrain.py:tiny_moe ...   # the tiny Mixture-of-Experts model
"""

from llada_jax.config import LLaDAConfig, train_config


def get_config(preset: str = "tiny"):
    c = train_config(LLaDAConfig.preset(preset), task="pretrain")
    c.max_length = 128
    c.batch_size = 8
    c.gradient_accumulation_steps = 1
    c.learning_rate = 1e-3
    c.max_steps = 200
    c.warmup_steps = 20
    c.save_steps = 100
    c.logging_steps = 10
    return c
