"""The train state, its sharded initialisation, and the jitted train step.

The state is a plain pytree: parameters as a nested dict (the model's nnx state as a pure dict), the optax
state, the step, and the non-finite counters. Shardings come from each parameter's logical axes and the
rules table; the optimizer state is sharded like the parameters (optax.tree_utils.tree_map_params).

The step is `jax.jit` with in/out shardings and the state donated. Inside it, for each of the
`gradient_accumulation_steps` micro-batches (a `lax.scan`): the forward process with keys folded from
(seed, step, row), the model, the pretraining or SFT loss and its gradient. The noise of a row depends only
on (seed, step, its index in the global batch), so a step gives the same result whatever the
micro-batching, device count or process count. A non-finite loss or gradient norm skips the update. A
Mixture-of-Experts model's step also reports the experts' balance (`router_metrics`), from each MoE layer's load
over the step's real tokens (summed over the micro-batches), which the loss's forward returns with the logits.

Packed rows (`data.pack`: the batch carries "segment_ids" [B, L], and for SFT "prompt_mask" [B, L] in place of
prompt and answer lengths): each document or example is a segment of its row that attends only to itself, with
positions restarting at 0 and its blocks laid from its own start (SFT: its prompt end), in every attention type and
in block diffusion's x_t ++ x_0 (`PackedRows`, `llada_jax.model.masks`). Each gets its own t from its row's key
(`diffusion.packed_forward_process`). The losses divide by the step's count of real tokens (pretraining) or examples
(SFT) (`with_step_count`): the step's loss is the mean over its examples of their SFT losses, or its documents'
summed CE / p_mask over its real tokens, for any accumulation. Padding (segment 0) is neither attended to nor scored.

LoRA (`config.lora.enabled`): the model carries adapters (`llada_jax.lora`); the state's parameters, gradients and
AdamW moments are the adapters' alone (float32), and the base is a separate, frozen argument of the step in its
stored dtype (bfloat16 halves it). The adapters' dropout masks are keyed by (seed, step, row) on a stream of
their own (DROPOUT_STREAM), so they too are the same on every layout and after a resume.

Attention-mask annealing (`adaptation.mask_annealing_steps` = N > 0), the causal-to-bidirectional adaptation
of an autoregressive checkpoint in DiffuLLaMA (Gong et al. 2024, "Scaling Diffusion Language Models via
Adaptation from Autoregressive Models"). At optimizer step s (0-based, `state.step`) the model sees

    visible = tril(ones[L, L]) | bernoulli(key_s, r_s, [L, L]),    r_s = min(1, (s + 1) / N)

query i sees key j when j <= i, and each future key independently with probability r_s: one [L, L] matrix per
step, shared by every row and micro-batch, keyed by fold_in(step key, ANNEALING_STREAM) (the step key of
`step_keys`; the noise and length-cut keys are unchanged), so a resumed run draws the same masks. From step
N - 1 on r = 1 and the mask is all True: the attention is exactly the model's own (bidirectional). r is
traced, so every step runs the one compiled program; N = 0 passes no mask at all. `eval_loss` uses no mask
(the fully annealed model, the one being trained towards), so evaluations stay comparable across steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llada_jax import sharding
from llada_jax.config import LLaDAConfig, lora_config_from
from llada_jax.diffusion import (
    block_forward_process,
    block_ids,
    complementary_masking,
    confidence_loss,
    forward_process,
    packed_block_forward_process,
    packed_forward_process,
    packed_sft_loss,
    pretraining_loss,
    random_length_valid,
    sft_loss,
)
from llada_jax.model import (
    LLaDAForMaskedLM,
    block_diffusion_ids,
    document_ids,
    expert_bias_update,
    load_balance_loss,
    positions_from_mask,
    positions_from_segments,
    router_z_loss,
)
from llada_jax.train.optimizer import learning_rate_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: number of train steps taken (skipped updates included)
    params: Any  # nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any
    nonfinite_streak: jax.Array  # int32: consecutive skipped updates
    nonfinite_total: jax.Array  # int32: all skipped updates


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of a train step."""

    task: str  # "pretrain" | "sft"
    seed: int
    mask_id: int
    eps: float
    random_length_prob: float
    accumulation: int
    micro_batch: int  # global rows per micro-batch
    length: int
    mask_annealing_steps: int  # N of the attention-mask annealing (0: off)
    # Block diffusion (block_causal models): the clipped mask-rate range and the block size of each step (the
    # model's, or the last (step, block_size) entry of the schedule at or before the step).
    block_diffusion: bool = False
    block_size: int | None = None
    mask_rate_min: float = 0.0
    mask_rate_max: float = 1.0
    block_size_schedule: tuple[tuple[int, int], ...] = ()
    # The objective's other terms (config.loss, config.moe) and the experts' bias update (0: off).
    complementary_masking: bool = False
    confidence_beta: float = 0.0
    load_balance_loss: float = 0.0
    router_z_loss: float = 0.0
    bias_update_rate: float = 0.0

    @classmethod
    def from_config(cls, config, model_config: LLaDAConfig) -> "StepConfig":
        bd = config.block_diffusion
        return cls(task=config.task, seed=int(config.seed), mask_id=model_config.mask_token_id,
                   eps=float(config.eps), random_length_prob=float(config.random_length_prob),
                   accumulation=int(config.gradient_accumulation_steps), micro_batch=int(config.batch_size),
                   length=int(config.max_length),
                   mask_annealing_steps=int(config.adaptation.mask_annealing_steps),
                   block_diffusion=model_config.attention_type == "block_causal",
                   block_size=model_config.block_size, mask_rate_min=float(bd.mask_rate_min),
                   mask_rate_max=float(bd.mask_rate_max),
                   block_size_schedule=tuple((int(s), int(b)) for s, b in bd.block_size_schedule),
                   complementary_masking=bool(config.loss.complementary_masking) and config.task == "sft",
                   confidence_beta=float(config.loss.confidence_beta),
                   load_balance_loss=float(config.moe.load_balance_loss) if model_config.is_moe else 0.0,
                   router_z_loss=float(config.moe.router_z_loss) if model_config.is_moe else 0.0,
                   bias_update_rate=bias_update_rate(config, model_config))

    @property
    def objective_terms(self) -> tuple[str, ...]:
        """The names of the objective's other terms this step reports (metrics)."""
        return tuple(name for name, on in (("confidence_entropy", self.confidence_beta > 0),
                                           ("moe_load_balance_loss", self.load_balance_loss > 0),
                                           ("moe_router_z_loss", self.router_z_loss > 0)) if on)

    def block_size_at(self, step) -> jax.Array:
        """The block size of optimizer step `step` (may be traced): the schedule's, else the model's."""
        size = jnp.int32(self.block_size)
        for start, block in self.block_size_schedule:  # sorted by step; a short list
            size = jnp.where(step >= start, jnp.int32(block), size)
        return size


class Trainer:
    """Builds the sharded state and the jitted train step for one model config, mesh and training config.

    The trained parameters (`TrainState.params`) are every parameter, or with LoRA (`config.lora`) the adapters
    alone: the base is then `frozen`, an argument of the step that is neither differentiated, nor in the
    optimizer, nor donated, nor saved (set it with `set_frozen` before stepping)."""

    def __init__(self, config, model_config: LLaDAConfig, mesh: jax.sharding.Mesh):
        self.config = config
        self.model_config = model_config
        self.mesh = mesh
        self.rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
        self.step_config = StepConfig.from_config(config, model_config)
        self.lora = lora_config_from(config)
        self.trained = nnx.Param if self.lora is None else nnx.LoRAParam
        model = nnx.eval_shape(lambda: LLaDAForMaskedLM(model_config, rngs=nnx.Rngs(0), lora=self.lora))
        self.graphdef, abstract_state, abstract_frozen = nnx.split(model, self.trained, ...)
        self.param_axes = nnx.to_pure_dict(jax.tree.map(
            sharding.param_logical_axes, abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable)))
        self.param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh, self.rules))
        self.frozen_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_frozen, mesh, self.rules))
        self.abstract_frozen = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                            nnx.to_pure_dict(abstract_frozen), self.frozen_shardings)
        self.frozen: dict = {}
        self.tx = make_optimizer(config, self.param_axes)
        self.schedule = learning_rate_schedule(config)
        self.abstract_params = nnx.to_pure_dict(abstract_state)
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_shardings = optax.tree_utils.tree_map_params(
            self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: replicated)
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                                          nonfinite_streak=replicated, nonfinite_total=replicated)
        batch_axes = sharding.batch_spec(self.rules, mesh)[0]
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes))  # [accum, batch, ...]

    # --- state ------------------------------------------------------------------------------------------

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        shapes = jax.eval_shape(self._fresh_state, self.abstract_params)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def _fresh_state(self, params) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=self.tx.init(params), nonfinite_streak=zero,
                          nonfinite_total=zero)

    def init_state(self, seed: int) -> TrainState:
        """A freshly initialised state, created directly in its shardings (never whole on one device)."""

        def init():  # with LoRA only the adapters are outputs: the base's initialisation is dead code to XLA
            model = LLaDAForMaskedLM(self.model_config, rngs=nnx.Rngs(seed), lora=self.lora)
            return self._fresh_state(nnx.to_pure_dict(nnx.state(model, self.trained)))

        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return jax.jit(init, out_shardings=self.state_shardings)()

    def set_frozen(self, model: LLaDAForMaskedLM) -> None:
        """LoRA: the frozen base is this (loaded, placed) model's parameters."""
        from flax import traverse_util

        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        have, want = (traverse_util.flatten_dict(tree) for tree in (params, self.abstract_frozen))
        for path in sorted(set(have) | set(want), key=str):
            a, b = have.get(path), want.get(path)
            if a is None or b is None or (a.shape, a.dtype) != (b.shape, b.dtype):
                def show(x):
                    return "missing" if x is None else f"{x.dtype}{list(x.shape)}"

                raise ValueError(f"the base model's parameter {'.'.join(map(str, path))} is {show(a)}, but the run's "
                                 f"model has {show(b)}")
        self.frozen = jax.device_put(params, self.frozen_shardings)

    def state_from_params(self, params) -> TrainState:
        """A fresh optimizer around given (sharded) parameters: fine-tuning from a checkpoint."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._fresh_state, in_shardings=(self.param_shardings,),
                           out_shardings=self.state_shardings)(params)

    # --- the step ---------------------------------------------------------------------------------------

    @functools.cached_property
    def _step_fn(self):
        return jax.jit(self._train_step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                       self.batch_sharding),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self._step_fn(state, self.frozen, batch)

    def lower(self, state, batch):
        """The lowered (not yet compiled) step, for ahead-of-time compilation and memory/FLOPs analysis (with
        LoRA, of the abstract frozen base)."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self._step_fn.lower(state, self.abstract_frozen, batch)

    @functools.cached_property
    def _eval_fn(self):
        def eval_loss(params, frozen, batch, index):
            c = self.step_config
            micro = jax.tree.map(lambda x: x[0], batch)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), EVAL_STREAM), index)
            row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(c.micro_batch))
            block_size = None if not c.block_diffusion else jnp.int32(c.block_size)  # the model's own
            return self._loss(params, frozen, micro, row_keys, None, block_size=block_size, with_terms=False)[0]

        return jax.jit(eval_loss, in_shardings=(self.param_shardings, self.frozen_shardings, self.batch_sharding, None))

    def eval_loss(self, params, batch: dict, index: int) -> jax.Array:
        """The loss of one [1, batch, length] batch without a gradient; its noise is keyed by (seed, `index`)
        alone, so evaluating the same batches twice gives the same number for the same parameters. No
        random-length cut: the whole sequence is scored."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self._eval_fn(params, self.frozen, batch, jnp.int32(index))

    def length_mask(self, step) -> jax.Array | None:
        """[micro_batch, length] bool mask of the positions step `step` keeps (the random-length cut of
        pretraining, the same for every micro-batch of the step), or None when nothing is ever cut."""
        c = self.step_config
        if c.task != "pretrain" or c.random_length_prob <= 0:
            return None
        _, cut_key = step_keys(c.seed, step)
        return random_length_valid(cut_key, c.micro_batch, c.length, c.random_length_prob)

    def visible_mask(self, step) -> jax.Array | None:
        """bool [length, length]: the attention mask of step `step` under mask annealing (the same for every
        row and micro-batch of the step), or None when annealing is off."""
        c = self.step_config
        if c.mask_annealing_steps <= 0:
            return None
        return annealing_mask(c.seed, step, c.length, c.mask_annealing_steps)

    def _loss(self, params, frozen, micro: dict, row_keys, valid, visible=None, block_size=None, dropout_keys=None,
              with_terms: bool = True):
        """(The step's objective on one micro-batch, (masked tokens, the experts' load [n_moe_layers, E] or None,
        the objective's other terms by name)). Without `with_terms`: the diffusion loss alone (evaluation)."""
        c = self.step_config
        model = nnx.merge(self.graphdef, params, frozen)
        ids = micro["input_ids"]
        prompt_lengths = micro.get("prompt_lengths") if c.task == "sft" else None
        packed = packed_rows(micro, valid, c.task) if "segment_ids" in micro else None  # data.pack
        if c.block_diffusion:  # a mask rate per block (see llada_jax.diffusion)
            process = functools.partial(block_forward_process, block_size=block_size, mask_rate_min=c.mask_rate_min,
                                        mask_rate_max=c.mask_rate_max)
        else:
            process = functools.partial(forward_process, eps=c.eps)

        def noise(key, row, prompt_length, row_valid):
            noisy, masked, p_mask = process(
                key, row[None], mask_id=c.mask_id,
                prompt_lengths=None if prompt_length is None else prompt_length[None],
                valid=None if row_valid is None else row_valid[None])
            return noisy[0], masked[0], p_mask[0]

        def packed_noise(key, row, segments, maskable, blocks):  # a t (block rates) per document of the row
            if c.block_diffusion:
                out = packed_block_forward_process(key, row[None], segments[None], blocks[None], mask_id=c.mask_id,
                                                   mask_rate_min=c.mask_rate_min, mask_rate_max=c.mask_rate_max,
                                                   maskable=maskable[None])
            else:
                out = packed_forward_process(key, row[None], segments[None], mask_id=c.mask_id, eps=c.eps,
                                             maskable=maskable[None])
            return tuple(x[0] for x in out)

        def objective(noisy, masked, p_mask):
            """(the diffusion loss, the logits, the router's statistics: MoE models, None for dense ones) of one
            noised copy of the micro-batch: the statistics come out of the same forward as the logits."""
            if c.block_diffusion:
                logits, stats = self._block_diffusion_logits(model, noisy, ids, prompt_lengths, valid, block_size,
                                                             dropout_keys, packed)
            elif packed is not None:
                logits, stats = model.expert_load(noisy, packed.tokens.astype(jnp.int32), visible,
                                                  segment_ids=packed.segment_ids, dropout_keys=dropout_keys)
            elif c.task == "sft":
                logits, stats = model.expert_load(noisy, visible=visible, dropout_keys=dropout_keys)
            else:
                logits, stats = model.expert_load(noisy, None if valid is None else valid.astype(jnp.int32), visible,
                                                  dropout_keys=dropout_keys)
            if packed is not None and c.task == "sft":
                loss = packed_sft_loss(logits, ids, masked, p_mask, packed.segment_ids, packed.maskable,
                                       micro.get(STEP_COUNT))
            elif c.task == "sft":
                loss = sft_loss(logits, ids, masked, p_mask, micro["answer_lengths"])
            else:
                loss = pretraining_loss(logits, ids, masked, p_mask, valid if packed is None else packed.tokens,
                                        micro.get(STEP_COUNT))
            return loss, logits, stats

        if packed is None:
            noisy, masked, p_mask = jax.vmap(noise)(row_keys, ids, prompt_lengths, valid)
        else:
            blocks = document_ids("block_causal", packed.segment_ids, block_size, packed.anchors).block \
                if c.block_diffusion else None
            noisy, masked, p_mask = jax.vmap(packed_noise)(row_keys, ids, packed.segment_ids, packed.maskable, blocks)
        copies = [(masked, *objective(noisy, masked, p_mask))]
        if c.complementary_masking:  # SFT: the same rows with the complement of their answer masks
            maskable = jnp.arange(ids.shape[1])[None, :] >= prompt_lengths[:, None] if packed is None \
                else packed.maskable
            noisy_c, masked_c, p_mask_c = complementary_masking(ids, masked, p_mask, maskable, mask_id=c.mask_id)
            copies.append((masked_c, *objective(noisy_c, masked_c, p_mask_c)))
        loss = sum(copy[1] for copy in copies) / len(copies)
        stats = jax.tree.map(lambda *a: sum(a), *(copy[3] for copy in copies)) if copies[0][3] is not None else None
        n_masked = sum(jnp.sum(copy[0]) for copy in copies)
        terms = {}  # the objective's other terms, reported as metrics
        if with_terms and c.confidence_beta > 0:
            entropies = [confidence_loss(logits, ids, m) for m, _, logits, _ in copies]
            n_right = sum(n for _, n in entropies)
            terms["confidence_entropy"] = sum(e * n for e, n in entropies) / jnp.maximum(n_right, 1)
            loss = loss + c.confidence_beta * terms["confidence_entropy"]
        if with_terms and stats is not None and c.load_balance_loss > 0:
            terms["moe_load_balance_loss"] = load_balance_loss(stats, self.model_config.experts_per_token)
            loss = loss + c.load_balance_loss * terms["moe_load_balance_loss"]
        if with_terms and stats is not None and c.router_z_loss > 0:
            terms["moe_router_z_loss"] = router_z_loss(stats, self.model_config.experts_per_token)
            loss = loss + c.router_z_loss * terms["moe_router_z_loss"]
        return loss, (n_masked, None if stats is None else stats.load, terms)

    @staticmethod
    def _block_diffusion_logits(model, noisy, ids, prompt_lengths, valid, block_size, dropout_keys=None,
                                packed: "PackedRows | None" = None):
        """(The block-diffusion predictions (see `llada_jax.diffusion`), the router's statistics): one forward over
        x_t ++ x_0, the logits of the noisy half; the statistics count both halves (the experts run both). The mask
        goes to the attention as ids (`block_diffusion_ids`): a row's blocks laid from its anchor, or with `packed`
        each document's blocks from its own anchor, inside the document, positions restarting per document."""
        b, length = ids.shape
        if packed is None:
            segments, tokens = jnp.ones((b, length), jnp.int32), valid
            anchor = 0 if prompt_lengths is None else prompt_lengths
            blocks = jnp.broadcast_to(block_ids(jnp.arange(length), block_size, anchor), (b, length))
            positions = positions_from_mask(None if valid is None else valid.astype(jnp.int32), b, length)
        else:
            segments, tokens = packed.segment_ids, packed.tokens
            blocks = document_ids("block_causal", segments, block_size, packed.anchors).block
            positions = positions_from_segments(segments)
        attention_mask = None if tokens is None else jnp.concatenate([tokens, tokens], axis=1).astype(jnp.int32)
        hidden, load = model.hidden_states_and_load(jnp.concatenate([noisy, ids], axis=1), attention_mask,
                                                    block_diffusion_ids(segments, blocks),
                                                    positions=jnp.concatenate([positions, positions], axis=1),
                                                    dropout_keys=dropout_keys)
        return model.logits(hidden[:, :length]), load  # the noisy half predicts

    def _train_step(self, state: TrainState, frozen: dict, batch: dict):
        c = self.step_config
        noise_key, _ = step_keys(c.seed, state.step)
        dropout_key = None  # LoRA dropout: its own stream of the step key, a key per row
        if self.lora is not None and self.lora.dropout > 0:
            dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), state.step), DROPOUT_STREAM)
        valid = self.length_mask(state.step)
        visible = self.visible_mask(state.step)
        block_size = c.block_size_at(state.step) if c.block_diffusion else None
        batch = with_step_count(batch, valid, c.task)  # packed rows: the losses' normaliser is the step's

        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        mc = self.model_config  # the experts' load is summed over the micro-batches (None: a dense model)
        zero_load = jnp.zeros((mc.n_moe_layers, mc.num_experts), jnp.float32) if mc.is_moe else None

        def micro_step(carry, xs):
            grads_sum, loss_sum, masked_sum, load_sum, terms_sum = carry
            micro, index = xs
            rows = index * c.micro_batch + jnp.arange(c.micro_batch)
            row_keys = jax.vmap(lambda r: jax.random.fold_in(noise_key, r))(rows)
            dropout_keys = None if dropout_key is None else jax.vmap(lambda r: jax.random.fold_in(dropout_key, r))(rows)
            (loss, (n_masked, load, terms)), grads = grad_fn(state.params, frozen, micro, row_keys, valid, visible,
                                                             block_size, dropout_keys)
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
            load_sum = jax.tree.map(jnp.add, load_sum, load)
            terms_sum = jax.tree.map(jnp.add, terms_sum, terms)
            return (grads_sum, loss_sum + loss, masked_sum + n_masked, load_sum, terms_sum), None

        (grads, loss, n_masked, load, terms), _ = jax.lax.scan(
            micro_step, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zero_load,
                         {name: jnp.zeros((), jnp.float32) for name in c.objective_terms}),
            (batch, jnp.arange(c.accumulation)))
        grads = jax.tree.map(lambda g: g / c.accumulation, grads)
        loss = loss / c.accumulation
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, new_opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = jax.tree.map(lambda p, u: (p + u.astype(p.dtype)), state.params, updates)
            if c.bias_update_rate > 0:  # the experts' balancing: not a gradient step (the bias has none)
                params = update_expert_bias(params, expert_bias_update(load, c.bias_update_rate))
            return params, new_opt_state

        # A conditional rather than a select between new and old values: the skipped branch costs nothing,
        # and an applied update reads the old state once (a third less optimizer time on CPU).
        new_params, new_opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
        applied_updates = state.step - state.nonfinite_total  # the schedule advances with applied updates
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "batch_checksum": batch_checksum(batch["input_ids"]),
            "grad_norm": grad_norm,
            "learning_rate": self.schedule(applied_updates),
            "masked_tokens": n_masked,
            "update_skipped": ~finite,
            "nonfinite_streak": new_state.nonfinite_streak,
            "nonfinite_total": new_state.nonfinite_total,
        }
        if load is not None:
            metrics.update(router_metrics(load))
        metrics.update({name: value / c.accumulation for name, value in terms.items()})
        return new_state, metrics


class PackedRows(NamedTuple):
    """What the objective reads of a micro-batch of packed rows (data.pack), per position [B, L]."""

    segment_ids: jax.Array  # int32: the row's documents (pretraining) or examples (SFT) 1, 2, ...; 0: padding
    tokens: jax.Array  # bool: the documents' tokens (kept by a length cut): attended to, counted by the loss
    maskable: jax.Array  # bool: what the forward process may mask: the tokens, or SFT's answers (EOS padding in)
    anchors: jax.Array  # int32: where the document's blocks are laid from within it (SFT: its prompt length)


def packed_rows(micro: dict, valid, task: str) -> PackedRows:
    """The `PackedRows` of a micro-batch with "segment_ids" (and, for SFT, "prompt_mask": 1 at prompt tokens)."""
    segments = micro["segment_ids"]
    tokens = segments > 0 if valid is None else (segments > 0) & valid
    if task != "sft":
        return PackedRows(segments, tokens, tokens, jnp.zeros_like(segments))
    prompt = micro["prompt_mask"].astype(bool) & tokens
    n = segments.shape[1] + 1
    prompt_lengths = jax.vmap(lambda p, s: jax.ops.segment_sum(p, s, num_segments=n))(prompt.astype(jnp.int32),
                                                                                      segments)
    return PackedRows(segments, tokens, tokens & ~prompt, jnp.take_along_axis(prompt_lengths, segments, axis=1))


STEP_COUNT = "step_count"  # the key `with_step_count` adds to a packed batch


def with_step_count(batch: dict, valid, task: str) -> dict:
    """A batch [accumulation, B, L] of packed rows with STEP_COUNT [accumulation] added: the step's real tokens
    (pretraining; those kept by the length cut `valid`) or examples (SFT), over the micro-batches' number. Each
    micro-batch's loss divides by it, so the step's loss is the sum over the step's documents over their count, as
    one batch of all the rows would give, whatever the accumulation (packed micro-batches hold varying counts).
    Unpacked batches are returned as they are."""
    if "segment_ids" not in batch:
        return batch
    segments = batch["segment_ids"]
    if task == "sft":
        first = jnp.ones(segments.shape[:-1] + (1,), bool)
        starts = jnp.concatenate([first, segments[..., 1:] != segments[..., :-1]], axis=-1)
        count = jnp.sum((segments > 0) & starts)
    else:
        count = jnp.sum((segments > 0) if valid is None else (segments > 0) & valid)
    accumulation = segments.shape[0]
    per_micro = jnp.maximum(count, 1).astype(jnp.float32) / accumulation
    return {**batch, STEP_COUNT: jnp.full((accumulation,), per_micro)}


# fold_in(key(seed), EVAL_STREAM) keys evaluation noise: apart from every training step's key (steps count up
# from 1 and fold in directly, so a step would have to reach 2^31 - 1 to collide).
EVAL_STREAM = 2**31 - 1


def step_keys(seed: int, step) -> tuple[jax.Array, jax.Array]:
    """(noise key, length-cut key) of a step: all of a step's randomness comes from (seed, step) alone, so
    checkpoints store the seed and the step, not a key."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), step)))


# fold_in(step key, ANNEALING_STREAM) keys a step's annealed attention mask. The step's noise and length-cut
# keys are split from the same key, and split(k)[i] is fold_in(k, i) (partitionable threefry, JAX's default):
# 0 and 1 are taken, 2 is the next free stream.
ANNEALING_STREAM = 2
# fold_in(step key, DROPOUT_STREAM) keys the LoRA adapters' dropout (then folded with the row, layer and target).
DROPOUT_STREAM = 3


def annealing_mask(seed: int, step, length: int, annealing_steps: int) -> jax.Array:
    """bool [length, length] attention mask of optimizer step `step` (0-based, may be traced) when annealing over
    `annealing_steps` steps: tril(ones) | bernoulli(key, min(1, (step + 1) / annealing_steps)), the key folded
    from (seed, step) alone (see the module docstring)."""
    step = jnp.asarray(step, jnp.int32)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), ANNEALING_STREAM)
    ratio = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / jnp.float32(annealing_steps))
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal | jax.random.bernoulli(key, ratio, (length, length))


DEFAULT_BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's bias update speed (gamma), for most of its pretraining


def bias_update_rate(config, model_config: LLaDAConfig) -> float:
    """The rate of the experts' bias update: `moe.bias_update_rate`, its default (-1) resolved to
    DEFAULT_BIAS_UPDATE_RATE for a model whose router has an expert bias and whose weights are trained (not LoRA,
    where the bias belongs to the frozen base), else 0."""
    rate = float(config.moe.bias_update_rate)
    if rate == -1:
        trained = model_config.router_expert_bias and not config.lora.enabled
        return DEFAULT_BIAS_UPDATE_RATE if model_config.is_moe and trained else 0.0
    return rate


def update_expert_bias(params: dict, delta: jax.Array) -> dict:
    """`params` with `delta` [n_moe_layers, E] added to the MoE layers' `expert_bias`: one stacked [layers, E] array
    (scanned layers) or one [E] per layer (unrolled layers, in layer order)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    paths = sorted((path for path in flat if path[-1] == "expert_bias"), key=lambda p: [str(k).zfill(6) for k in p])
    if len(paths) == 1 and flat[paths[0]].ndim == 2:
        flat[paths[0]] = flat[paths[0]] + delta.astype(flat[paths[0]].dtype)
    else:
        for row, path in enumerate(paths):
            flat[path] = flat[path] + delta[row].astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def router_metrics(load: jax.Array) -> dict:
    """The experts' balance in a step from each MoE layer's load [n_moe_layers, E] ((token, expert) pairs of the
    step's real tokens): the mean over layers of the busiest expert's load over the mean load (1: balanced, E /
    experts_per_token: every token to the same experts), and the fraction of experts that got no token."""
    max_over_mean = jnp.max(load, axis=-1) / jnp.mean(load, axis=-1)
    return {"moe_max_over_mean_load": jnp.mean(max_over_mean), "moe_unused_experts": jnp.mean(load == 0)}


def batch_checksum(ids: jax.Array) -> jax.Array:
    """A position-weighted sum of the step's token ids (int32, wrapping): equal checksums mean, in practice,
    the same data in the same order, whatever the sharding."""
    weights = (jnp.arange(ids.size, dtype=jnp.int32) % 9973 + 1).reshape(ids.shape)
    return jnp.sum(ids.astype(jnp.int32) * weights, dtype=jnp.int32)


def host_scalar(x):
    """A replicated scalar as a Python number (from this process's copy: works across processes)."""
    return np.asarray(x.addressable_shards[0].data if isinstance(x, jax.Array) else x).item()


def params_all_finite(params) -> bool:
    finite = jax.jit(lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))(params)
    return bool(np.asarray(finite.addressable_shards[0].data))  # replicated: this process's copy


def flops_per_token(model_config: LLaDAConfig, length: int, lora=None) -> float:
    """Training FLOPs per token: 6 x (matmul parameters a token uses) + 12 x layers x length x d_model (attention).

    The matmul parameters are those of every projection and the output head (the embedding lookup is not a
    matmul); of a Mixture-of-Experts layer, its router, its shared experts and the `experts_per_token` routed
    experts a token is sent to, not the others (the active parameters of `count_active_params`). Attention scores
    and the weighted sum cost 2 x 2 x L x d per token and layer forward, and training is three times the forward
    (forward + two backward matmuls). With `lora` (a LoRAConfig) the frozen base has no weight-gradient matmul:
    4 x its matmul parameters, plus 6 x the adapters'.
    """
    import math

    from llada_jax.lora import layer_targets, target_layout

    c = model_config
    d, hd, n, k = c.d_model, c.head_dim, c.n_heads, c.effective_n_kv_heads
    attention_params = d * (n + 2 * k) * hd + n * hd * d
    dense_mlp = 3 * d * c.mlp_hidden_size
    moe_mlp = d * c.num_experts + 3 * d * (c.experts_per_token + c.num_shared_experts) * (c.expert_hidden_size or 0)
    matmul_params = (c.n_layers * attention_params + (c.n_layers - c.n_moe_layers) * dense_mlp
                     + c.n_moe_layers * moe_mlp + d * c.padded_vocab_size)
    attention = 12.0 * c.n_layers * length * d
    if lora is None:
        return 6.0 * matmul_params + attention
    adapters = sum(lora.rank * (math.prod(target_layout(c, t)[0]) + math.prod(target_layout(c, t)[2]))
                   for i in range(c.n_layers) for t in layer_targets(c, lora, c.is_moe_layer(i)))
    return 4.0 * matmul_params + 6.0 * adapters + attention


# Dense bf16 peak FLOP/s per device, for the MFU estimate (None: unknown, e.g. CPUs).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
)


def peak_flops_per_device(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None
