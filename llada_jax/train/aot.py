"""Ahead-of-time sizing of a training configuration: `llada-jax compile-check`.

Lowers and compiles the exact train step of a config for N devices (fake CPU devices when the machine has
fewer) without allocating any parameter, and reports per-device memory (arguments, outputs, temporaries)
and the model FLOPs per step (XLA's own count visits a scanned loop body once, so the analytic count is
used), so a pod configuration is sized before any hardware is booked. The memory figures come
from XLA's CPU compiler: layouts and fusion differ on TPU/GPU, so treat them as an estimate of the same order,
not an exact budget.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llada_jax.train.step import Trainer, flops_per_token


def compile_train_step(config, model_config, mesh) -> dict:
    trainer = Trainer(config, model_config, mesh)
    state = trainer.abstract_state()
    accum, batch, length = config.gradient_accumulation_steps, config.batch_size, config.max_length
    ids = jax.ShapeDtypeStruct((accum, batch, length), jnp.int32, sharding=trainer.batch_sharding)
    batch_tree = {"input_ids": ids}
    if config.task == "sft":
        lengths = jax.ShapeDtypeStruct((accum, batch), jnp.int32, sharding=trainer.batch_sharding)
        batch_tree.update(prompt_lengths=lengths, answer_lengths=lengths)
    compiled = trainer.lower(state, batch_tree).compile()
    memory = compiled.memory_analysis()
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    tokens = accum * batch * length
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "parameters": n_params,
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes_estimate": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        "model_flops_per_step": flops_per_token(model_config, length) * tokens,
        "tokens_per_step": tokens,
    }


def format_report(r: dict) -> str:
    gib = 1024**3
    lines = [
        f"devices {r['devices']}  mesh {r['mesh']}  parameters {r['parameters']:,}",
        f"per-device memory: arguments {r['argument_bytes'] / gib:.2f} GiB, outputs {r['output_bytes'] / gib:.2f} GiB "
        f"(donated/aliased {r['alias_bytes'] / gib:.2f} GiB), temporaries {r['temp_bytes'] / gib:.2f} GiB, "
        f"peak estimate {r['peak_bytes_estimate'] / gib:.2f} GiB",
        f"FLOPs per step: {r['model_flops_per_step']:.3e} ({r['tokens_per_step']:,} tokens), "
        f"{r['model_flops_per_step'] / r['devices']:.3e} per device",
    ]
    return "\n".join(lines)
