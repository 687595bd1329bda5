"""The KV cache of the cached samplers: every layer's keys (before RoPE) and values."""

from __future__ import annotations

from typing import NamedTuple

import jax

Array = jax.Array


class KVCache(NamedTuple):
    """Keys (before RoPE) and values of every layer: k, v [n_layers, B, S, kv_heads, head_dim] in the compute
    dtype (per block: [B, S, kv_heads, head_dim]). Filled by `LLaDAForMaskedLM.hidden_states_and_kv`, read by
    `hidden_states_from_kv`."""

    k: Array
    v: Array

