"""Continual pretraining of an autoregressive checkpoint into a masked-diffusion model (AR -> LLaDA).

    llada-jax pretrain --config configs/adapt_from_ar.py --model_name_or_path /path/to/Llama-2-7b-hf \
        --data_path ... --output_dir ...
    llada-jax compile-check --config configs/adapt_from_ar.py:qwen2_5_7b --num_devices 8   # size Qwen2.5-7B

The architecture comes from the checkpoint (`--model_name_or_path`: a local transformers directory of model_type
llama, mistral or qwen2; the mask token <|mdm_mask|> is added and the vocabulary padded to 128 rows); the
`get_config` argument only picks the shape used when sizing without a checkpoint (llama2_7b, the default, or
qwen2_5_7b). The adaptation settings are DiffuLLaMA's (Gong et al. 2024, "Scaling Diffusion Language Models via
Adaptation from Autoregressive Models", ICLR 2025; HKUNLP/DiffuLLaMA): from meta-llama/Llama-2-7b-hf (also the
start of the official LLaDA pretraining config), learning rate 1.5e-5, sequences of 2048 tokens, 20,000 optimizer
steps, mixed-precision bf16 (its DiffuLLaMA-training/run_distributed.sh: per-GPU batch 60 x 4 accumulation);
the output shift (the prediction for token i read at i - 1, kept by Dream 7B as well); and attention-mask
annealing from causal to bidirectional over 10,000 steps (the `anneal_steps` default of its diffusion training
arguments). The loss is this project's LLaDA objective (CE / p_mask over the masked tokens, eps 1e-3, as
DiffuLLaMA's t ~ U(eps, 1)), with no random-length cut (DiffuLLaMA trains on full packed sequences).
This file's global batch (16 x 4 sequences of 2048 tokens per update) and 500 warmup steps are ours: set
--config.batch_size and --config.gradient_accumulation_steps for the devices you have.
"""

from llada_jax.config import LLaDAConfig, train_config


def get_config(shape: str = "llama2_7b"):
    model = LLaDAConfig.preset(shape, dtype="bfloat16", remat_policy="save_dots_no_batch", shift_logits=True)
    c = train_config(model, task="pretrain")
    c.learning_rate = 1.5e-5
    c.lr_scheduler_type = "cosine"
    c.batch_size = 16
    c.gradient_accumulation_steps = 4
    c.max_steps = 20000
    c.warmup_steps = 500
    c.max_length = 2048
    c.eps = 1e-3
    c.random_length_prob = 0.0
    c.adaptation.mask_annealing_steps = 10000
    c.save_steps = 1000
    return c
