"""Ahead-of-time sizing of a sampling job: `llada-jax compile-check --sample`.

Lowers and compiles the jitted sampler program of `samplers.program` for a model shape (a preset, or the config of
a saved model: no weights are read), a mesh over N devices (fake CPU devices when the machine has fewer), a
batch and prompt / generation lengths, without allocating any parameter, and reports the per-device memory:
the parameters' share (arguments), the program's temporaries (activations, the KV cache with a cache option,
the logits) and its outputs. So a user sees before booking hardware whether, say, LLaDA-8B in bf16 with
tensor=8 fits 16 GB chips. The figures come from XLA's CPU compiler: layouts and fusion differ on TPU / GPU, so
they are an estimate of the same order, not an exact budget.

One CPU artefact is removed: the CPU has no bfloat16 matmul, so XLA converts bf16 weights to float32 before each
matmul, and its while-loop invariant code motion hoists those conversions out of the sampler's loops, which
would hold a float32 copy of every weight (twice the bf16 parameters) for the whole run; TPU and GPU multiply in
bf16 and hold no such copy. The sampler is therefore compiled for sizing with that pass off (the conversion
stays inside the loop: one layer's weights at a time, which the figures still include). A Mixture-of-Experts
model's grouped matmuls are sized as the native op's, as the train step's (`llada_jax.train.aot`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from llada_jax import sharding
from llada_jax.config import LLaDAConfig
from llada_jax.model import abstract_model
from llada_jax.model.moe import sized_as_grouped_matmul
from llada_jax.sampling.options import SamplerOptions
from llada_jax.sampling.samplers import program

NO_HOISTED_CONVERSIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compile_sampler(config: LLaDAConfig, options: SamplerOptions, mesh: jax.sharding.Mesh, rules, *,
                    batch: int, prompt_length: int) -> dict:
    """The compiled sampler's memory per device and its shapes (see the module docstring)."""
    opts = options.resolved(config)
    parallel = sharding.data_parallel_size(rules, mesh)
    rows = -(-batch // parallel) * parallel  # the sampler pads the batch to the data-parallel size
    graphdef, state = abstract_model(config)
    shardings = sharding.state_shardings(state, mesh, rules)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    row_sharding = jax.NamedSharding(mesh, sharding.batch_spec(rules, mesh))
    ids = jax.ShapeDtypeStruct((rows, prompt_length), jnp.int32, sharding=row_sharding)
    keys = None
    if opts.needs_rng:
        key_type = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
        keys = jax.ShapeDtypeStruct(key_type.shape, key_type.dtype,
                                    sharding=jax.NamedSharding(mesh, sharding.batch_spec(rules, mesh, 1)))
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    grouped_sized = on_cpu and config.is_moe  # XLA:CPU's dense ragged_dot (see sized_as_grouped_matmul)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        with sized_as_grouped_matmul() if grouped_sized else contextlib.nullcontext():
            lowered = program.lower(graphdef, state, ids, ids, keys, opts=opts, record=False)
        compiled = lowered.compile(NO_HOISTED_CONVERSIONS if on_cpu else None)
    memory = compiled.memory_analysis()
    n_params = sum(int(x.size) for x in jax.tree.leaves(state))
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "parameters": n_params,
        "param_dtype": config.param_dtype,
        "batch": rows,
        "prompt_length": prompt_length,
        "gen_length": opts.gen_length,
        "method": opts.method,
        "cache": opts.cache,
        "grouped_matmul_sized": grouped_sized,  # MoE on CPU: ragged_dot's buffers sized as the native op's
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes_estimate": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   + memory.temp_size_in_bytes),
    }


def format_report(r: dict) -> str:
    gib = 1024**3
    lines = [
        f"sampler on {r['devices']} devices, mesh {r['mesh']}: {r['parameters']:,} parameters ({r['param_dtype']}), "
        f"batch {r['batch']}, prompt {r['prompt_length']} + {r['gen_length']} generated, {r['method']}, "
        f"cache {r['cache']}",
        f"per-device memory: parameters and inputs {r['argument_bytes'] / gib:.2f} GiB, temporaries "
        f"{r['temp_bytes'] / gib:.2f} GiB, outputs {r['output_bytes'] / gib:.3f} GiB, peak estimate "
        f"{r['peak_bytes_estimate'] / gib:.2f} GiB",
    ]
    return "\n".join(lines + ([GROUPED_NOTE] if r["grouped_matmul_sized"] else []))


# The line of a report whose Mixture-of-Experts program was sized with `sized_as_grouped_matmul`.
GROUPED_NOTE = ("(grouped matmuls sized as TPU / GPU run them: XLA:CPU expands ragged_dot densely; see "
                "llada_jax/train/aot.py)")
