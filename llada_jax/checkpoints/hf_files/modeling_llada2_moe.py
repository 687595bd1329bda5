"""LLaDA 2.x (Mixture-of-Experts) mask predictor in PyTorch (`trust_remote_code=True`), written for llada-jax.

The network of inclusionAI's LLaDA2.0 models (model_type "llada2_moe"), a bidirectional Ling / BailingMoeV2.
One block:

    h   = x + dense(attention(rope(qnorm(q)), rope(knorm(k)), v)),   q, k, v = query_key_value(input_layernorm(x))
    out = h + mlp(post_attention_layernorm(h))

RMSNorm normalises in float32 and casts back before the weight. `query_key_value` is one projection whose
output rows are all query heads (head-major), then all key heads, then all value heads; with `use_qk_norm`
each query and key head goes through an RMSNorm over head_dim (`query_layernorm`, `key_layernorm`, one weight
shared by the heads) before the rotary embedding, values are not normed. The rotary embedding uses the
half-rotation ("rotate_half") convention on the first `rotary_dim` dimensions of each head (the rest pass
through), inv_freq = 1 / rope_theta^(2j / rotary_dim), applied in float32. Attention is grouped-query, scaled
by head_dim^-0.5, with its scores and softmax in float32 and no causal mask. There are no biases unless
`use_qkv_bias`.

The first `first_k_dense_replace` MLPs are SwiGLU, `down_proj(silu(gate_proj(m)) * up_proj(m))`, of
`intermediate_size`; the others are Mixture-of-Experts: `num_experts` SwiGLU experts of
`moe_intermediate_size`, `num_experts_per_tok` of them chosen per token by the router, plus a shared SwiGLU of
moe_intermediate_size * num_shared_experts that every token uses. The router (LLaDA2MoeGate): logits =
m @ gate.weight^T in float32, scores = sigmoid(logits) (softmax over the experts with `score_function`
"softmax"); the choice is made on scores + expert_bias: with n_group > 1 the experts fall in n_group
consecutive groups, each scored by the sum of its two best biased scores, and only the best topk_group groups
compete; the top num_experts_per_tok biased scores win, ties going to the lower index (as jax.lax.top_k).
The winners' unbiased scores are the weights, divided by (their sum + 1e-20) when `norm_topk_prob`, times
`routed_scaling_factor`; the output is the weighted sum of the chosen experts (accumulated in float32 and cast
back) plus the shared expert. The experts run one at a time over the tokens that chose them (correctness
over speed).

The parameter names are the published ones (`model.word_embeddings`, `model.layers.{i}.{input_layernorm,
attention.{query_key_value,query_layernorm,key_layernorm,dense},post_attention_layernorm,mlp.*}`, `model.norm`,
`lm_head`; `mlp.gate.weight` [num_experts, hidden_size] and the buffer `mlp.gate.expert_bias`, kept in float32,
`mlp.experts.{e}.*`, `mlp.shared_experts.*`), so the published checkpoints and this project's exports load
unchanged.

`attention_mask` is either [batch, length] (1 = real token): padded keys are ignored by every query and rotary
positions count real tokens only, so a left-padded row gives the same logits on its real tokens as the
unpadded row; or [batch, 1, length, length] (a query's row of the keys it may see: True / False, or an
additive float mask), e.g. the block-causal mask of block diffusion, with positions 0, 1, ... (the published
model's use). `position_ids` ([batch, length] or [length]), when given, are the rotary positions in either case.

The forward pass of LLaDA2MoeModelLM returns `MaskedLMOutput(logits=...)` with float32 logits; `labels` are
not accepted, as the LLaDA loss needs the masking probabilities (see llada_jax.diffusion). LLaDA2MoeModel
returns `BaseModelOutput(last_hidden_state=...)`, the final-normed hidden states. There is no key/value cache.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .configuration_llada2_moe import LLaDA2MoeConfig

ROUTER_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _check_config(config: LLaDA2MoeConfig):
    """Refuse, naming the field, what this implementation does not do."""
    if getattr(config, "use_bias", False):
        raise ValueError("use_bias=True is not supported by this implementation")
    if config.hidden_act not in ACT2FN:
        raise ValueError(f"hidden_act={config.hidden_act!r} is not an activation transformers knows")
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"rope_scaling={scaling!r} is not supported (only unscaled rotary embeddings)")
    rd, hd = config.rotary_dim, config.head_dim
    if not 0 < rd <= hd or rd % 2:
        raise ValueError(f"rotary_dim={rd!r} must be even and in (0, head_dim={hd}]")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_key_value_heads={config.num_key_value_heads} does not divide num_attention_heads="
                         f"{config.num_attention_heads}")
    if config.num_experts:
        if config.score_function not in ("sigmoid", "softmax"):
            raise ValueError(f"score_function={config.score_function!r} is not supported "
                             "(expected 'sigmoid' or 'softmax')")
        if config.router_dtype is not None and config.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype={config.router_dtype!r} is not supported (expected one of "
                             f"{sorted(ROUTER_DTYPES)})")
        groups, keep = _groups(config)
        if config.num_experts % groups:
            raise ValueError(f"n_group={groups} does not divide num_experts={config.num_experts}")
        if groups > 1 and config.num_experts // groups < 2:
            raise ValueError("each expert group needs at least 2 experts (a group is scored by its two best)")
        if not 1 <= keep <= groups:
            raise ValueError(f"topk_group={keep} must be in [1, n_group={groups}]")
        if not 1 <= config.num_experts_per_tok <= keep * (config.num_experts // groups):
            raise ValueError(f"num_experts_per_tok={config.num_experts_per_tok} must be in [1, the "
                             f"{keep * (config.num_experts // groups)} experts of the kept groups]")


def _groups(config: LLaDA2MoeConfig) -> Tuple[int, int]:
    """(n_group, topk_group), a missing n_group meaning one group of all experts."""
    groups = getattr(config, "n_group", None) or 1
    keep = getattr(config, "topk_group", None) or groups
    return groups, keep


class LLaDA2MoeRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(positions: torch.Tensor, rotary_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch, 1, length, rotary_dim] in float32 for integer positions [batch, length]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
                                / rotary_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dimensions of x [batch, heads, length, head_dim] (x * cos +
    rotate_half(x) * sin, in float32), pass the rest through; cast back to x's dtype."""
    rd = cos.shape[-1]
    x32 = x.float()
    rot, rest = x32[..., :rd], x32[..., rd:]
    r1, r2 = rot.chunk(2, dim=-1)
    rot = rot * cos + torch.cat((-r2, r1), dim=-1) * sin
    return torch.cat((rot, rest), dim=-1).to(x.dtype)


class LLaDA2MoeAttention(nn.Module):
    """Grouped-query attention with a fused query/key/value projection, QK-norm and partial rotary embeddings."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.query_key_value = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(hd, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(hd, config.rms_norm_eps)
        self.use_qk_norm = config.use_qk_norm
        self.dense = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        b, length, _ = x.shape
        qkv = self.query_key_value(x).view(b, length, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, length, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # query head h reads kv head h // group
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.head_dim**-0.5
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1).to(v.dtype)
        att = torch.matmul(probs, v)
        return self.dense(att.transpose(1, 2).reshape(b, length, -1))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU: down_proj(act(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: LLaDA2MoeConfig, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """The router: `weight` [num_experts, hidden_size] and, with moe_router_enable_expert_bias, the buffer
    `expert_bias` [num_experts] (float32) that shifts the choice but not the weights."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = _groups(config)
        self.score_function = config.score_function
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.router_dtype = ROUTER_DTYPES.get(config.router_dtype)  # None: the input's dtype
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (chosen experts [tokens, top_k], their float32 weights [tokens, top_k])."""
        dtype = self.router_dtype or x.dtype
        logits = F.linear(x.to(dtype), self.weight.to(dtype)).float()
        scores = logits.sigmoid() if self.score_function == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        if self.n_group > 1:
            tokens, n_experts = choice.shape
            grouped = choice.view(tokens, self.n_group, n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [tokens, n_group]
            kept = _top_indices(group_scores, self.topk_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, kept, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, n_experts)
        chosen = _top_indices(choice, self.top_k)
        weights = scores.gather(1, chosen)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scaling


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest values along the last axis, best first, ties to the lower index."""
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :k]


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts plus the shared expert (named `mlp` in a Mixture-of-Experts layer)."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        if config.num_shared_experts:
            self.shared_experts = LLaDA2MoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)
        else:
            self.shared_experts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, weights = self.gate(x)
        chosen, weights = chosen.reshape(-1), weights.reshape(-1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.gate.top_k)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in chosen.unique().tolist():
            picked = chosen == e
            rows = token[picked]
            out.index_add_(0, rows, self.experts[e](x[rows]).float() * weights[picked, None])
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class LLaDA2MoeDecoderLayer(nn.Module):
    """One pre-norm block: attention, then a dense or Mixture-of-Experts MLP."""

    def __init__(self, config: LLaDA2MoeConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_id):
            self.mlp = LLaDA2MoeSparseMoeBlock(config)
        else:
            self.mlp = LLaDA2MoeMLP(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    # The router's bias stays float32 when the model is loaded in bfloat16 / float16 (router_dtype "fp32").
    _keep_in_fp32_modules_strict = ["expert_bias"]

    def _init_weights(self, module):
        """Normal with std initializer_range for the projections, the embedding and the router; norms to one, the
        router's expert bias to zero."""
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LLaDA2MoeGate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                nn.init.zeros_(module.expert_bias)
        elif isinstance(module, LLaDA2MoeRMSNorm):
            nn.init.ones_(module.weight)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """Embedding, layers and final norm (`word_embeddings`, `layers`, `norm`): `model(input_ids, attention_mask=None,
    position_ids=None) -> BaseModelOutput(last_hidden_state [batch, length, hidden_size])`."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # loaded from a LLaDA2MoeModelLM checkpoint

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        _check_config(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.word_embeddings = value

    def _positions_and_bias(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            position_ids: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rotary positions [batch, length] and the float32 additive attention bias [batch or 1, 1, 1 or queries,
        keys] (None: every query sees every key)."""
        b, length = x.shape[:2]
        positions, allowed, bias = None, None, None
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.to(device=x.device, dtype=torch.bool)
            if not bool(real.all()):  # else nothing padded: the unmasked path
                positions = (real.long().cumsum(-1) - 1).clamp(min=0)
                allowed = real[:, None, None, :]
        elif attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype == torch.bool:
                allowed = attention_mask.to(x.device)
            else:
                bias = attention_mask.to(device=x.device, dtype=torch.float32)
        elif attention_mask is not None:
            raise ValueError(f"attention_mask must be [batch, length] or [batch, 1, length, length], got shape "
                             f"{tuple(attention_mask.shape)}")
        if allowed is not None:
            # A large negative number rather than -inf, so that a query with no key to see (a row of padding)
            # gives uniform attention instead of NaN.
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device)
            bias = bias.masked_fill(~allowed, torch.finfo(torch.float32).min)
        if position_ids is not None:
            positions = position_ids.to(x.device).expand(b, length)
        elif positions is None:
            positions = torch.arange(length, device=x.device)[None].expand(b, length)
        return positions, bias

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple, BaseModelOutput]:
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("this implementation has no key/value cache")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        positions, bias = self._positions_and_bias(x, attention_mask, position_ids)
        cos, sin = rotary_tables(positions, self.config.rotary_dim, self.config.rope_theta)
        hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, bias)
            else:
                x = layer(x, cos, sin, bias)
        x = self.norm(x)
        hidden_states = tuple(hidden_states) + (x,) if output_hidden_states else None
        if not return_dict:
            return (x,) + ((hidden_states,) if hidden_states is not None else ())
        return BaseModelOutput(last_hidden_state=x, hidden_states=hidden_states)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """`model(input_ids, attention_mask=None, position_ids=None) -> MaskedLMOutput(logits [batch, length,
    vocab_size], float32)`."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}  # tied only with tie_word_embeddings

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple, MaskedLMOutput]:
        if kwargs.get("labels") is not None:
            raise ValueError("labels are not supported: the LLaDA loss needs the masking probabilities")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                         return_dict=True, **kwargs)
        logits = self.lm_head(out.last_hidden_state).float()
        if not return_dict:
            return (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
        return MaskedLMOutput(logits=logits, hidden_states=out.hidden_states)
