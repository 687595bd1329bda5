"""LLaDA-8B supervised fine-tuning with the original recipe.

lr 1e-5, 4 sequences x 16 accumulation steps per update, 10k steps, 500 warmup; prompts are never masked and the
answer's EOS padding is trained like answer tokens. batch_size is global and must divide over the devices (all on
fsdp by default): on 8 devices set --config.batch_size=8 --config.gradient_accumulation_steps=8 (the same 64
sequences per update). Start from a pretrained checkpoint:

    llada-jax sft --config configs/llada_8b_sft.py --model_name_or_path LLaDA-8B-Base-orbax --data_path ...
"""

from llada_jax.config import LLaDAConfig, sft_defaults, train_config


def get_config():
    c = sft_defaults(train_config(LLaDAConfig.llada_8b(dtype="bfloat16", remat_policy="save_dots_no_batch"),
                                  task="sft"))
    c.learning_rate = 1e-5
    c.batch_size = 4
    c.gradient_accumulation_steps = 16
    c.max_steps = 10000
    c.warmup_steps = 500
    c.max_length = 4096
    c.save_steps = 500
    return c
