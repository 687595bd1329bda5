"""Ahead-of-time sizing of a training configuration: `llada-jax compile-check`.

Lowers and compiles the exact train step of a config for N devices (fake CPU devices when the machine has
fewer) without allocating any parameter, and reports per-device memory (arguments, outputs, temporaries)
and the model FLOPs per step (XLA's own count visits a scanned loop body once, so the analytic count is
used), so a pod configuration is sized before any hardware is booked. The memory figures come
from XLA's CPU compiler: layouts and fusion differ on TPU/GPU, so treat them as an estimate of the same order,
not an exact budget.

With LoRA the trained parameters (the adapters: float32 masters, AdamW moments) and the frozen base (an argument of
the step in `model.param_dtype`, counted in the arguments) are reported apart.

One CPU artefact is removed when 16-bit weights are stored in the compute dtype (`model.param_dtype ==
model.dtype`, e.g. a bfloat16 LoRA base computing in bfloat16): the CPU has no bfloat16 matmul, so XLA converts
each bf16 weight to float32 before its matmul, and while-loop invariant code motion hoists those conversions out
of the layer scan and the accumulation loop, a float32 copy of every weight held through the step (30 GiB for
LLaDA-8B) that TPU and GPU, multiplying bf16 directly, never make: such a config is compiled for sizing with that
pass off, as the sampler's (`llada_jax.sampling.aot`). With float32 masters computing in bf16 the casts exist on
every backend and where XLA keeps them was not established, so the pass stays on there.

A second one concerns Mixture-of-Experts models: XLA:CPU has no grouped matmul, and JAX lowers `ragged_dot` there
densely, every row against every local expert under a mask ([local experts, rows, d] operands, 16 GiB buffers for
LLaDA2.0-mini at one 512-token row a device), where TPU and GPU run a grouped matmul whose buffers are the rows'.
On the CPU a MoE step is therefore lowered for sizing with each grouped matmul replaced by a matmul of the same
operand and output shapes (`llada_jax.model.moe.sized_as_grouped_matmul`): the native op's buffers, a program
sized and never run. The report says so.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from llada_jax.model.moe import sized_as_grouped_matmul
from llada_jax.sampling.aot import GROUPED_NOTE, NO_HOISTED_CONVERSIONS
from llada_jax.train.step import Trainer, flops_per_token


def compile_train_step(config, model_config, mesh) -> dict:
    trainer = Trainer(config, model_config, mesh)
    state = trainer.abstract_state()
    accum, batch, length = config.gradient_accumulation_steps, config.batch_size, config.max_length
    ids = jax.ShapeDtypeStruct((accum, batch, length), jnp.int32, sharding=trainer.batch_sharding)
    batch_tree = {"input_ids": ids}
    if config.data.pack:  # packed rows: per-position segments (and SFT's prompt mask) instead of lengths
        batch_tree.update(segment_ids=ids, **({"prompt_mask": ids} if config.task == "sft" else {}))
    elif config.task == "sft":
        lengths = jax.ShapeDtypeStruct((accum, batch), jnp.int32, sharding=trainer.batch_sharding)
        batch_tree.update(prompt_lengths=lengths, answer_lengths=lengths)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    no_hoisting = (on_cpu and model_config.param_dtype == model_config.dtype
                   and model_config.dtype != "float32")  # 16-bit weights computing in their own dtype
    grouped_sized = on_cpu and model_config.is_moe  # XLA:CPU's dense ragged_dot (see the module docstring)
    with sized_as_grouped_matmul() if grouped_sized else contextlib.nullcontext():
        lowered = trainer.lower(state, batch_tree)
    compiled = lowered.compile(NO_HOISTED_CONVERSIONS if no_hoisting else None)
    memory = compiled.memory_analysis()
    trained, trained_bytes = _count(state.params)
    frozen, frozen_bytes = _count(trainer.abstract_frozen)
    tokens = accum * batch * length
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "parameters": trained + frozen,
        "lora": trainer.lora is not None,
        "trained_parameters": trained,  # in the optimizer (fp32 masters + two AdamW moments each)
        "trained_parameter_bytes": trained_bytes,  # the masters' bytes, whole (not per device)
        "frozen_parameters": frozen,  # LoRA: the base, an argument of the step in model.param_dtype
        "frozen_parameter_bytes": frozen_bytes,
        "param_dtype": model_config.param_dtype,
        "dtype": model_config.dtype,
        "hoisted_conversions_removed": no_hoisting,  # the CPU's bf16-matmul artefact (module docstring)
        "grouped_matmul_sized": grouped_sized,  # MoE on CPU: ragged_dot's buffers sized as the native op's
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes_estimate": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        "model_flops_per_step": flops_per_token(model_config, length, trainer.lora) * tokens,
        "tokens_per_step": tokens,
    }


def _count(tree) -> tuple[int, int]:
    """(elements, bytes) of a pytree of (abstract) arrays, whole (not per device)."""
    leaves = jax.tree.leaves(tree)
    return sum(int(x.size) for x in leaves), sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in leaves)


def format_report(r: dict) -> str:
    gib = 1024**3
    lines = [(f"devices {r['devices']}  mesh {r['mesh']}  parameters {r['parameters']:,}  "
              f"(stored {r['param_dtype']}, compute {r['dtype']})")]
    if r["lora"]:
        lines.append(f"LoRA: trained {r['trained_parameters']:,} ({r['trained_parameter_bytes'] / gib:.3f} GiB, "
                     f"float32), frozen {r['frozen_parameters']:,} ({r['frozen_parameter_bytes'] / gib:.2f} GiB), "
                     f"whole model; the frozen base is an argument of the step (in the arguments below)")
    lines += [
        (f"per-device memory: arguments {r['argument_bytes'] / gib:.2f} GiB, outputs "
         f"{r['output_bytes'] / gib:.2f} GiB (donated/aliased {r['alias_bytes'] / gib:.2f} GiB), temporaries "
         f"{r['temp_bytes'] / gib:.2f} GiB, peak estimate {r['peak_bytes_estimate'] / gib:.2f} GiB"),
        (f"FLOPs per step: {r['model_flops_per_step']:.3e} ({r['tokens_per_step']:,} tokens), "
         f"{r['model_flops_per_step'] / r['devices']:.3e} per device"),
    ]
    if r["hoisted_conversions_removed"]:
        lines.append("(compiled without XLA:CPU's hoisted float32 copies of the bf16 weights, which TPU / GPU never "
                     "make: see llada_jax/train/aot.py)")
    if r["grouped_matmul_sized"]:
        lines.append(GROUPED_NOTE)
    return "\n".join(lines)
