"""LLaDA 2.x supervised fine-tuning with dFactory's recipe (inclusionAI/dFactory `configs/sft/llada2_flash_bd_sft.yaml`).

    llada-jax sft --config configs/llada2_sft.py:llada2_mini --model_name_or_path LLaDA2.0-mini \\
        --data_path gsm8k_train.jsonl --config.data.tokenizer LLaDA2.0-mini --output_dir runs/llada2_sft \\
        --config.mesh.expert=8

dFactory's values: block diffusion with blocks of 32 and mask rates in [0.3, 0.8] (`noise_range_low/high`),
sequences of 2048, a global batch of 16, AdamW (0.9, 0.999), learning rate 1e-5 with 3% warm-up and cosine decay,
weight decay 0.1, gradient clipping 1.0, mixed precision (fp32 masters, bf16 compute) with gradient checkpointing.
Their example runs one epoch of GSM8K (7,473 examples: 467 steps of 16); max_steps here is that. Their cosine
decays to VeOmni's default floor of 1e-7, about 0 here (min_lr_ratio 0).

The options of LLaDA 2.0's recipe beyond dFactory's example, off here as there: --config.loss.confidence_beta=2.0
(CAP, dFactory's recommended value) and --config.loss.complementary_masking=true (docs/objectives.md). The
argument picks the preset (llada2_mini by default, or llada2_flash). The experts' bias is updated after each step
(docs/moe.md); LoRA (--config.lora.enabled=true) trains adapters on the attention and the shared experts.
"""

from llada_jax.config import LLaDAConfig, sft_defaults, train_config


def get_config(preset: str = "llada2_mini"):
    model = LLaDAConfig.preset(preset, dtype="bfloat16", remat_policy="save_dots_no_batch")
    if model.attention_type != "block_causal" or not model.is_moe:
        raise ValueError(f"configs/llada2_sft.py: {preset!r} is not a LLaDA 2.x preset")
    c = sft_defaults(train_config(model, task="sft"))
    c.max_length = 2048
    c.batch_size = 16
    c.gradient_accumulation_steps = 1
    c.learning_rate = 1e-5
    c.max_steps = 467
    c.warmup_steps = 14  # 3% of the steps
    c.lr_scheduler_type = "cosine"
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip = 1.0
    c.optimizer.min_lr_ratio = 0.0
    c.block_diffusion.mask_rate_min, c.block_diffusion.mask_rate_max = 0.3, 0.8
    c.save_steps = 100
    return c
