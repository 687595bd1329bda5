"""LLaDA 2.0's continued pretraining: block diffusion with the block size scheduled warm-up -> stable -> decay.

    llada-jax pretrain --config configs/llada2_continued_pretrain.py:llada2_mini,100000 \
        --model_name_or_path CHECKPOINT --data_path 'corpus/*.jsonl' --output_dir runs/llada2_cpt \
        --config.mesh.expert=8

The argument is PRESET[,MAX_STEPS] (llada2_mini and 100000 by default): the schedule's steps are fractions of
max_steps, so give the run's length here rather than with --max_steps (a schedule step the run never reaches is
an error).

The LLaDA 2.0 report ("LLaDA2.0: Scaling Up Diffusion Language Models to 100B", inclusionAI, 2025) turns an
autoregressive Ling 2.0 model into a diffusion one with a block-level Warmup-Stable-Decay schedule:

- warm-up: block diffusion with the block size grown step by step, 1 (autoregressive) -> 4 -> 32 -> 64 -> the
  whole sequence (4096);
- stable: full-sequence diffusion (one block of 4096: the plain masked-diffusion objective) for most of the data;
- decay: back to compact blocks of 32, the size the released models decode with.

The report gives the sizes, not the steps at which they change: the fractions of `max_steps` below are this
file's choice (short warm-up stages, 70% stable, the last 15% at 32), to be set for a real run. The model is the
argument's preset (llada2_mini by default, or llada2_flash), block-causal with blocks of 32 (its `block_size`: the
decay's size and the sampler's); start it from a checkpoint with --model_name_or_path (a LLaDA 2.x Hugging Face
directory or a run of this project). A block of the whole sequence trains the same objective as a bidirectional
model, through the x_t ++ x_0 form (twice the positions; the clean half only serves as keys).

Documents are packed into rows of 4096 (`data.pretrain_mode`): the report masks attention across documents
inside a row (a document-level mask); set the packing option of the data group for that where this project
has it (see docs/data.md). bf16 compute, fp32 masters, layers scanned and rematerialised, the experts' bias
updated by the auxiliary-loss-free rule (docs/moe.md).
"""

from llada_jax.config import LLaDAConfig, train_config

LENGTH = 4096
# (fraction of max_steps, block size): the report's sizes; the fractions are this file's.
SCHEDULE = ((0.0, 1), (0.02, 4), (0.04, 32), (0.06, 64), (0.08, LENGTH), (0.85, 32))


def block_size_schedule(max_steps: int) -> tuple[tuple[int, int], ...]:
    return tuple((int(round(fraction * max_steps)), size) for fraction, size in SCHEDULE)


def get_config(arg: str = "llada2_mini"):
    preset, _, steps = arg.partition(",")
    model = LLaDAConfig.preset(preset, dtype="bfloat16", remat_policy="save_dots_no_batch")
    if model.attention_type != "block_causal" or not model.is_moe:
        raise ValueError(f"configs/llada2_continued_pretrain.py: {preset!r} is not a LLaDA 2.x preset")
    c = train_config(model, task="pretrain")
    c.max_length = LENGTH
    c.max_steps = int(steps) if steps else 100_000
    c.warmup_steps = 2_000
    c.lr_scheduler_type = "wsd"
    c.block_diffusion.block_size_schedule = block_size_schedule(c.max_steps)
    return c
