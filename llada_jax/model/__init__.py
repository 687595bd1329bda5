"""The LLaDA network in Flax NNX, by concept:

    layers.py     RMSNorm, rotary embeddings (full or partial), projections, parameters, remat policies
    masks.py      positions of a row, which keys each query sees (bidirectional, causal, block-causal; packed
                  documents and BD3-LM's x_t ++ x_0 from per-position ids)
    attention.py  scaled dot-product attention (XLA with a flash-attention backward; cuDNN on GPU)
    moe.py        the Mixture-of-Experts MLP: router, dropless grouped experts, expert parallelism
    block.py      one pre-norm block: attention and an MLP slot (dense SwiGLU or MoE)
    kv_cache.py   the cached samplers' keys and values
    network.py    `LLaDAForMaskedLM`: embedding, the (scanned) blocks, final norm, output head

The names below are the model layer's public interface.
"""

from llada_jax.model.block import LLaDABlock
from llada_jax.model.kv_cache import KVCache
from llada_jax.model.layers import BLD, BLKH, BLM, BLNH, BLV, apply_rope, dense, rms_norm, rope_tables
from llada_jax.model.masks import (MaskIds, block_diffusion_ids, document_ids, positions_from_mask,
                                   positions_from_segments, prediction_sources, visible_from_ids, visible_pairs)
from llada_jax.model.moe import RouterStats, expert_bias_update, load_balance_loss, router_z_loss
from llada_jax.model.network import (DENSE_BLOCKS, LLaDAForMaskedLM, abstract_model, count_active_params,
                                     count_params, layer_stack, layer_stacks)

__all__ = ["LLaDABlock", "KVCache", "BLD", "BLKH", "BLM", "BLNH", "BLV", "apply_rope", "dense",
           "rms_norm", "rope_tables", "positions_from_mask", "RouterStats", "expert_bias_update", "load_balance_loss",
           "router_z_loss", "prediction_sources", "visible_pairs", "DENSE_BLOCKS",
           "MaskIds", "block_diffusion_ids", "document_ids", "positions_from_segments", "visible_from_ids",
           "LLaDAForMaskedLM", "abstract_model", "count_active_params", "count_params", "layer_stack", "layer_stacks"]
