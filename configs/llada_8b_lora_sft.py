"""LLaDA-8B supervised fine-tuning with LoRA adapters on one 80 GB accelerator.

Rank 16, alpha 32, dropout 0.05 on every block projection (q/k/v, attention output, the MLP's gate, up and down
projections): 41,943,040 trained parameters (0.5% of 8.0B). Only the adapters have float32 masters and AdamW
moments; the frozen base is stored in bfloat16 and the compute is bfloat16. Remat `save_dots_no_batch` (the
block's projection outputs kept, the rest recomputed) is the least recompute that fits an 80 GB accelerator with
margin; `full` remat needs less memory at the cost of an extra forward pass per step (per-device figures for each
policy: docs/lora.md, "Memory"). One sequence of 4096 tokens per micro-batch, 16 micro-batches per update (16
sequences, 65,536 tokens per optimizer step: a quarter of the original SFT recipe's 64 sequences; raise
gradient_accumulation_steps for larger updates, it costs time, not memory).

batch_size is global and must divide over the devices (the mesh puts them all on fsdp), so as it is this file runs
on one device. On N devices (N dividing 16) set --config.batch_size=N --config.gradient_accumulation_steps=16/N
(the same 16 sequences per update); 8 x 16 GB chips (TPU v5e-8) also need full remat:
--config.model.remat_policy=full --config.batch_size=8 --config.gradient_accumulation_steps=2.

`model_name_or_path` is left to the command line: pass the local directory of GSAI-ML/LLaDA-8B-Instruct (the Hugging Face
download, or its Orbax conversion) with --model_name_or_path; the base's weights are read from it, cast to
bfloat16, and referenced (not copied) by the adapter checkpoints:

    llada-jax sft --config configs/llada_8b_lora_sft.py --model_name_or_path /path/to/LLaDA-8B-Instruct \
        --data_path sft.jsonl --output_dir runs/lora

Size it first (no weights are read): llada-jax compile-check --config configs/llada_8b_lora_sft.py --num_devices 1
"""

from llada_jax.config import LLaDAConfig, sft_defaults, train_config


def get_config():
    model = LLaDAConfig.llada_8b(dtype="bfloat16", param_dtype="bfloat16", remat_policy="save_dots_no_batch")
    c = sft_defaults(train_config(model, task="sft"))
    c.model_name_or_path = ""  # the base: pass --model_name_or_path (without one, the run says so and stops)
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    # c.lora.targets: the default, all seven projections of every block.
    # Adapters start at zero (B = 0) and train far fewer weights than full fine-tuning: LoRA SFT commonly uses
    # a learning rate ~10x full fine-tuning's, 1e-4 to 2e-4 (QLoRA, Dettmers et al. 2023: 2e-4 for 7B-13B models;
    # the PEFT / Alpaca-LoRA recipes likewise), against the 1e-5 of LLaDA's full-parameter SFT.
    c.learning_rate = 2e-4
    c.batch_size = 1
    c.gradient_accumulation_steps = 16
    c.max_length = 4096
    c.save_steps = 500
    c.mesh.data = 1
    c.mesh.fsdp = -1  # all the devices there are (one by default); batch_size must be a multiple of them
    c.mesh.tensor = 1
    return c
