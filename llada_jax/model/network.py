"""The LLaDA network: embedding, blocks, final norm and output head, in Flax NNX.

The official `LLaDAModelLM`: the embedding `wte`, the blocks (`llada_jax.model.block`), a final `ln_f`, and an
untied output head `ff_out` (or the transposed embedding when `weight_tying`). Models imported from an
autoregressive checkpoint may have q/k/v biases (`include_qkv_bias`, Qwen2), causal attention
(`attention_type="causal"`), and read the prediction for position i from the output at i - 1 (`shift_logits`, the
AR alignment that Dream and DiffuLLaMA keep; `prediction_states`). Parameter names are the official module names,
so the Hugging Face key tables (`llada_jax.checkpoints.hf_keys`) are short lists.

Layers. With `scan_layers` the blocks' parameters are stacked on a leading "layers" axis and run by `lax.scan`
(compile time flat in depth): `blocks` holds every layer of a dense model; a Mixture-of-Experts model with
`first_dense_layers` dense layers holds those in `dense_blocks` and its MoE layers in `blocks` (two scans, as
MaxText keeps dense and MoE layers apart). Without it, `blocks` is a list of the n_layers blocks.

KV cache (for the cached samplers). `hidden_states_and_kv` runs the whole sequence like `hidden_states` and
also returns every layer's keys (before RoPE) and values (`KVCache`); `hidden_states_from_kv` runs only a
window of positions, whose queries attend to the cached keys and values of the whole sequence with the
window's own recomputed. Both go through the same block code (`LLaDABlock.forward`).

Packed rows (`segment_ids`, training on several documents per row): every document sees only itself, its positions
restart at 0, and the attention type's pattern is laid from its own start (`document_inputs`), so each document
gets the logits it gets alone. The mask travels to the attention as per-position ids (`masks.MaskIds`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import lora as lora_lib
from llada_jax import sharding
from llada_jax.config import LLaDAConfig, LoRAConfig
from llada_jax.model.block import LLaDABlock
from llada_jax.model.kv_cache import KVCache
from llada_jax.model.layers import BLD, BLV, dense, dtype, param, remat, rms_norm, rope_tables, trunc_normal
from llada_jax.model.masks import (MaskIds, document_ids, positions_from_mask, positions_from_segments,
                                   prediction_sources, visible_from_ids, visible_pairs)
from llada_jax.model.moe import RouterStats

Array = jax.Array

DENSE_BLOCKS = "dense_blocks"  # the dense first layers of a scanned Mixture-of-Experts model


class LLaDAForMaskedLM(nnx.Module):
    """LLaDA mask predictor: `model(input_ids, attention_mask=None) -> float32 logits [B, L, V]`.

    `attention_mask` [B, L] marks real tokens with 1. Keys where it is 0 are ignored by every query, and
    positions count real tokens only, so a left-padded row gives the same logits on its real tokens as the
    same row without padding.

    With `lora` (a LoRAConfig), every block's targeted projections carry LoRA adapters (`llada_jax.lora`):
    their `nnx.LoRAParam`s are the trainable part, the rest the frozen base; `merge_lora()` folds them in.
    """

    def __init__(self, config: LLaDAConfig, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.config = config
        self.lora = lora
        d, v = config.d_model, config.padded_vocab_size
        pd = dtype(config.param_dtype)
        self.wte = param(trunc_normal(rngs, (v, d), d**-0.5, pd), ("vocab", "embed"))
        if config.scan_layers:
            stacks = layer_stacks(config)
            if DENSE_BLOCKS in stacks:
                self.dense_blocks = _stacked_blocks(config, rngs, lora, *stacks[DENSE_BLOCKS], moe=False)
            self.blocks = _stacked_blocks(config, rngs, lora, *stacks["blocks"], moe=config.is_moe)
        else:
            self.blocks = nnx.List([LLaDABlock(config, i, rngs=rngs, moe=config.is_moe_layer(i))
                                    for i in range(config.n_layers)])
        self.ln_f = param(jnp.ones((d,), pd), ("norm",))
        if not config.weight_tying:
            self.ff_out = param(trunc_normal(rngs, (d, v), d**-0.5, pd), ("embed", "vocab"))
        if lora is not None and not config.scan_layers:  # drawn after the base: its initial values stay the same
            for block in self.blocks:
                block.add_adapters(lora, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, visible: Array | None = None, *,
                 positions: Array | None = None, block_anchor=0, segment_ids: Array | None = None,
                 dropout_keys: Array | None = None) -> Array:
        """float32 logits [B, L, V], logits[:, i] the prediction for position i (with `shift_logits`, read from
        the output at i - 1). `visible` [L, L] or [B, L, L] (True = query i may see key j; or the `MaskIds` they
        are built from) replaces the attention type's pattern (the annealed masks of causal-to-bidirectional
        adaptation, the noisy ++ clean sequence of block-diffusion training); `positions` [B, L] replaces the
        positions counted from `attention_mask`; `block_anchor` (scalar or [B]; with `segment_ids` also [B, L]) is
        where block_causal blocks are laid from; `segment_ids` [B, L] packs several documents in a row (see `document_inputs`); `dropout_keys`
        [B] (one key per row) turns on the LoRA adapters' dropout (training)."""
        return self.expert_load(input_ids, attention_mask, visible, positions=positions, block_anchor=block_anchor,
                                segment_ids=segment_ids, dropout_keys=dropout_keys)[0]

    def prediction_states(self, hidden: Array, attention_mask: Array | None = None, positions: Array | None = None
                          ) -> Array:
        """The final residual streams aligned with the positions they predict: `hidden` [B, L, D] of a whole
        sequence itself, or with `shift_logits` the stream at i - 1 for position i (a row's first real token keeps
        its own, as position 0 does in Dream, so a left-padded row predicts as the unpadded one; with `positions`,
        every position 0: the first token of each packed document)."""
        if not self.config.shift_logits:
            return hidden
        sources = prediction_sources(attention_mask, jnp.arange(hidden.shape[1]), hidden.shape[0], positions)
        return jnp.take_along_axis(hidden, sources[..., None], axis=1)

    def document_inputs(self, segment_ids: Array, attention_mask: Array | None = None, visible=None,
                        positions: Array | None = None, block_anchor=0):
        """(attention mask, positions, visible) of packed rows: `segment_ids` [B, L] numbers the documents of a row
        1, 2, ... (contiguous runs; 0 is padding, seen by no document). Each document sees only itself, with the
        attention type's pattern laid from its own start (block_causal: blocks from `block_anchor`, a position
        within the document, scalar, [B] or [B, L]), and its positions restart at 0, so it gets the logits it gets
        alone. A dense `visible` (annealed masks) is kept inside the documents; `MaskIds` are used as they are."""
        real = segment_ids > 0
        mask = real if attention_mask is None else real & attention_mask.astype(bool)
        positions = positions_from_segments(segment_ids) if positions is None else positions
        c = self.config
        if visible is None:
            visible = document_ids(c.attention_type, segment_ids, c.block_size, block_anchor)
        elif not isinstance(visible, MaskIds):
            visible = visible & visible_from_ids(MaskIds(jnp.asarray(segment_ids, jnp.int32)))
        return mask.astype(jnp.int32), positions, visible

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | None = None, **overrides) -> "LLaDAForMaskedLM":
        """Load an Orbax checkpoint or a Hugging Face directory (auto-detected); see
        `llada_jax.checkpoints.load_pretrained` for the keyword arguments (param_dtype, mesh, scan_layers, ...).
        (The one import of the checkpoint layer from below it: the convention users expect.)"""
        from llada_jax.checkpoints import load_pretrained

        return load_pretrained(path, dtype, **overrides)

    def save_pretrained(self, path: str, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
                        tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
        """Write this model as a Hugging Face directory in the official LLaDA layout (safetensors, config.json
        and this project's PyTorch modeling code; LoRA adapters merged); see `llada_jax.checkpoints.save_pretrained`."""
        from llada_jax.checkpoints import save_pretrained

        return save_pretrained(self, path, dtype=dtype, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
                               overwrite=overwrite)

    def merge_lora(self) -> "LLaDAForMaskedLM":
        """This model with its LoRA adapters folded into the base weights (W + alpha / rank A B, in the base's
        param dtype): a plain model with the same outputs up to float rounding and no adapter matmuls. A model
        without adapters is returned as it is."""
        if self.lora is None:
            return self
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        if self.config.scan_layers:
            for name in layer_stacks(self.config):
                params[name] = lora_lib.merge_block(params[name], self.lora)
        else:
            params["blocks"] = {i: lora_lib.merge_block(block, self.lora) for i, block in params["blocks"].items()}
        graphdef, state = abstract_model(self.config)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    def embed(self, input_ids: Array) -> Array:
        """The embeddings of `input_ids`: the residual stream starts in the wider of the parameter and compute
        dtypes (what every block's output is, so the layer loop's carry keeps one dtype: a bfloat16 base under
        float32 compute starts in float32)."""
        c = self.config
        dt = jnp.promote_types(dtype(c.param_dtype), dtype(c.dtype))
        return sharding.constrain(jnp.take(self.wte[...], input_ids, axis=0).astype(dt), BLD)

    def rope_and_key_mask(self, attention_mask: Array | None, batch: int, length: int,
                          positions: Array | None = None):
        """(cos, sin [B, L, 1, head_dim] of each position, boolean key mask [B, L] or None) for a sequence;
        `positions` [B, L] replaces the positions counted from `attention_mask`."""
        c = self.config
        if positions is None:
            positions = positions_from_mask(attention_mask, batch, length)
        cos, sin = rope_tables(positions, c.rotary_dim, c.rope_theta)
        return cos, sin, None if attention_mask is None else attention_mask.astype(bool)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None, visible: Array | None = None, *,
                      positions: Array | None = None, block_anchor=0, segment_ids: Array | None = None,
                      dropout_keys: Array | None = None) -> Array:
        """Final residual stream (before ln_f) for `input_ids` [B, L], at each position (not shifted:
        `prediction_states` aligns it with the predicted positions). Keyword arguments as in `__call__`."""
        return self.hidden_states_and_load(input_ids, attention_mask, visible, positions=positions,
                                           block_anchor=block_anchor, segment_ids=segment_ids,
                                           dropout_keys=dropout_keys)[0]

    def hidden_states_and_load(self, input_ids: Array, attention_mask: Array | None = None,
                               visible: Array | None = None, *, positions: Array | None = None, block_anchor=0,
                               segment_ids: Array | None = None, dropout_keys: Array | None = None
                               ) -> tuple[Array, RouterStats | None]:
        """`hidden_states` plus what each MoE layer's router did (`RouterStats` stacked over the MoE layers: the
        (token, expert) pairs routed to each expert [n_moe_layers, E], ...), over the real tokens (`attention_mask`;
        every position without one). None for a dense model. Keyword arguments as in `__call__`."""
        length = input_ids.shape[1]
        if segment_ids is not None:
            attention_mask, positions, visible = self.document_inputs(segment_ids, attention_mask, visible, positions,
                                                                      block_anchor)
        rope = self.rope_and_key_mask(attention_mask, *input_ids.shape, positions=positions)
        pairs = visible if visible is not None else self.visible_keys(jnp.arange(length), length, block_anchor)
        hidden, _, load = self._layers_and_load(self.embed(input_ids), *rope, pairs=pairs, dropout_keys=dropout_keys)
        return hidden, load

    def hidden_states_and_kv(self, input_ids: Array, attention_mask: Array | None = None, *, block_anchor=0
                             ) -> tuple[Array, KVCache]:
        """`hidden_states` plus every layer's keys and values of every position (a KV-cache fill):
        (hidden [B, L, D], KVCache [n_layers, B, L, kv_heads, head_dim]). Same numbers as `hidden_states`."""
        length = input_ids.shape[1]
        return self._layers(self.embed(input_ids), *self.rope_and_key_mask(attention_mask, *input_ids.shape),
                            pairs=self.visible_keys(jnp.arange(length), length, block_anchor), collect=True)

    def hidden_states_from_kv(self, window_ids: Array, start, cache: KVCache, attention_mask: Array | None = None,
                              *, block_anchor=0) -> Array:
        """Final residual stream of positions `start` .. start + n - 1 of a sequence of S positions, computed
        from their tokens `window_ids` [B, n] and the cached keys and values of the whole sequence (`cache`,
        from `hidden_states_and_kv`; the window's own are recomputed). `attention_mask` [B, S] is the whole
        sequence's; positions outside the window contribute their cached keys and values only, so the result
        equals `hidden_states` of the whole sequence at the window when the cache is up to date with it.
        `start` may be traced; n is static."""
        return self.window_and_kv(window_ids, start, cache, attention_mask, block_anchor=block_anchor)[0]

    def window_and_kv(self, window_ids: Array, start, cache: KVCache, attention_mask: Array | None = None, *,
                      block_anchor=0) -> tuple[Array, KVCache]:
        """`hidden_states_from_kv` plus the window's own keys and values (KVCache [n_layers, B, n, ...]): what
        an exact block-by-block cache appends once a block is final."""
        b, n = window_ids.shape
        key_cos, key_sin, key_mask = self.rope_and_key_mask(attention_mask, b, cache.k.shape[2])
        cos, sin = (jax.lax.dynamic_slice_in_dim(t, start, n, axis=1) for t in (key_cos, key_sin))
        pairs = self.visible_keys(start + jnp.arange(n), cache.k.shape[2], block_anchor)
        return self._layers(self.embed(window_ids), cos, sin, key_mask, pairs=pairs, cache=cache, start=start,
                            key_rope=(key_cos, key_sin))

    def visible_keys(self, query_index: Array, key_length: int, block_anchor=0) -> Array | None:
        """Which keys each query sees by the attention type (see `visible_pairs`); None for all."""
        c = self.config
        return visible_pairs(c.attention_type, query_index, key_length, c.block_size, block_anchor)

    def _layers(self, x: Array, cos: Array, sin: Array, key_mask: Array | None, *, pairs: Array | None = None,
                cache: KVCache | None = None, start=None, key_rope=None, collect: bool = False,
                dropout_keys: Array | None = None) -> tuple[Array, KVCache | None]:
        """Run every block over x: (x, the blocks' KVCache of x's positions when `collect` or with `cache`)."""
        x, kv, _ = self._layers_and_load(x, cos, sin, key_mask, pairs=pairs, cache=cache, start=start,
                                         key_rope=key_rope, collect=collect, dropout_keys=dropout_keys)
        return x, kv

    def _layers_and_load(self, x: Array, cos: Array, sin: Array, key_mask: Array | None, *,
                         pairs: Array | None = None, cache: KVCache | None = None, start=None, key_rope=None,
                         collect: bool = False, dropout_keys: Array | None = None
                         ) -> tuple[Array, KVCache | None, RouterStats | None]:
        """`_layers` plus the router statistics of every MoE layer (stacked `RouterStats`; None without experts)."""
        c = self.config
        plain = cache is None and not collect

        def apply_block(graphdef, params, x, layer_cache, layer):
            block = nnx.merge(graphdef, params)
            keys = None if dropout_keys is None else lora_lib.fold_keys(dropout_keys, layer)
            out, kv, load = block.forward(x, cos, sin, key_mask, layer_cache, start, key_rope, pairs, keys)
            return out, (None if plain else kv, load)

        def layer_cache(first: int, count: int | None = None):  # the cache of layers first.. (one layer: None)
            if cache is None:
                return None
            return jax.tree.map(lambda a: a[first] if count is None else a[first:first + count], cache)

        kvs, loads = [], []
        if c.scan_layers:
            for name, (first, count) in layer_stacks(c).items():
                graphdef, params = nnx.split(getattr(self, name))
                step = remat(lambda h, xs, g=graphdef: apply_block(g, xs[0], h, xs[1], xs[2]), c.remat_policy,
                             in_scan=True)
                layers = jnp.arange(first, first + count, dtype=jnp.uint32)
                x, (kv, load) = jax.lax.scan(step, x, (params, layer_cache(first, count), layers))
                kvs.append(kv)
                loads.append(load)
        else:
            for i, block in enumerate(self.blocks):
                graphdef, params = nnx.split(block)
                x, (kv, load) = remat(lambda p, h, lc, layer, g=graphdef: apply_block(g, p, h, lc, layer),
                                      c.remat_policy, in_scan=False)(params, x, layer_cache(i), jnp.uint32(i))
                kvs.append(None if kv is None else jax.tree.map(lambda a: a[None], kv))
                loads.append(None if load is None else jax.tree.map(lambda a: a[None], load))
        kv = None if plain else jax.tree.map(lambda *a: jnp.concatenate(a), *kvs)
        loads = [load for load in loads if load is not None]
        return x, kv, jax.tree.map(lambda *a: jnp.concatenate(a), *loads) if loads else None

    def expert_load(self, input_ids: Array, attention_mask: Array | None = None, visible: Array | None = None, *,
                    positions: Array | None = None, block_anchor=0, segment_ids: Array | None = None,
                    dropout_keys: Array | None = None) -> tuple[Array, RouterStats | None]:
        """(float32 logits as `__call__`, the MoE layers' router statistics as `hidden_states_and_load`; None for a
        dense model): one forward for both (the train step's)."""
        hidden, load = self.hidden_states_and_load(input_ids, attention_mask, visible, positions=positions,
                                                   block_anchor=block_anchor, segment_ids=segment_ids,
                                                   dropout_keys=dropout_keys)
        documents = None if segment_ids is None else positions_from_segments(segment_ids)
        return self.logits(self.prediction_states(hidden, attention_mask, documents)), load

    def logits(self, x: Array) -> Array:
        """float32 logits from the final residual stream: ln_f then the output head."""
        c = self.config
        dt = dtype(c.dtype)
        h = rms_norm(x, self.ln_f[...], c.rms_norm_eps).astype(dt)
        head = self.wte[...].T if c.weight_tying else self.ff_out[...]
        logits = dense(h, head.astype(dt), out_dtype=jnp.float32)
        return sharding.constrain(logits.astype(jnp.float32), BLV)


def layer_stacks(config: LLaDAConfig) -> dict[str, tuple[int, int]]:
    """{attribute: (first layer, number of layers)} of the stacked blocks of a scanned model, in layer order."""
    if config.is_moe and config.first_dense_layers:
        k = config.first_dense_layers
        return {DENSE_BLOCKS: (0, k), "blocks": (k, config.n_layers - k)}
    return {"blocks": (0, config.n_layers)}


def layer_stack(config: LLaDAConfig, layer: int) -> tuple[str, int]:
    """(the stacked blocks holding layer `layer` in the scanned layout, its index there)."""
    for name, (first, count) in layer_stacks(config).items():
        if first <= layer < first + count:
            return name, layer - first
    raise IndexError(f"layer {layer} of a model with {config.n_layers} layers")


def _stacked_blocks(config: LLaDAConfig, rngs: nnx.Rngs, lora: LoRAConfig | None, first: int, count: int, *,
                    moe: bool) -> LLaDABlock:
    """Layers first .. first + count - 1, their parameters stacked on a leading "layers" axis (for lax.scan)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0, 0), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs, layer_id):
        block = LLaDABlock(config, layer_id, rngs=rngs, moe=moe)
        if lora is not None:
            block.add_adapters(lora, rngs)
        return block

    return create(rngs, jnp.arange(first, first + count))


def abstract_model(config: LLaDAConfig, lora: LoRAConfig | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameter state of ShapeDtypeStructs) of a model, built with `nnx.eval_shape`: the shapes
    and dtypes without allocating anything (restore targets, shardings, sizes)."""
    return nnx.split(nnx.eval_shape(lambda: LLaDAForMaskedLM(config, rngs=nnx.Rngs(0), lora=lora)))


def count_params(config: LLaDAConfig) -> int:
    """Number of parameters of a model with this config, counted abstractly (nothing is allocated)."""
    _, state = abstract_model(config)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))

def count_active_params(config: LLaDAConfig) -> int:
    """Parameters a token uses (what the FLOP count of MFU counts): all of a dense model's; of a Mixture-of-Experts
    model, all but the routed experts it is not sent to (every MoE layer's router and shared experts count)."""
    c = config
    unused = c.n_moe_layers * (c.num_experts - c.experts_per_token) * 3 * c.d_model * (c.expert_hidden_size or 0)
    return count_params(config) - unused
