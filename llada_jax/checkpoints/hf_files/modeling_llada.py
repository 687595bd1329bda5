"""LLaDA mask predictor in PyTorch (`trust_remote_code=True`), written for llada-jax exports.

A bidirectional LLaMA. One block:

    h   = x + attn_out(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),   n = attn_norm(x)
    out = h + ff_out(silu(ff_proj(m)) * up_proj(m)),                              m = ff_norm(h)

RMSNorm normalises in float32 and casts back before the weight; rotary embeddings use the half-rotation
("rotate_half") convention and are applied in float32; attention has no causal mask and is grouped-query
when n_kv_heads < n_heads; there are no biases. The parameter names are the official ones
(`model.transformer.wte`, `model.transformer.blocks.{i}.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,
ff_proj,up_proj,ff_out}`, `model.transformer.ln_f`, `model.transformer.ff_out`), so the official
checkpoints and this project's exports load unchanged. With `weight_tying` there is no `ff_out` head and the
logits use the embedding matrix.

Models converted from an autoregressive checkpoint may differ in three config fields: `include_qkv_bias`
(q/k/v projections with biases, `...q_proj.bias` etc., as in Qwen2 and the official code), `attention_type`
"causal" (position i attends to positions <= i; the default "bidirectional" is LLaDA) and `shift_logits`
(the logits for position i are the output at i - 1, a row's first real token keeping its own, as position 0
does in Dream). A block-diffusion model has `attention_type` "block_causal" with `block_size`: index i is in
block floor((i - block_anchor) / block_size) and a query sees every key of its block and of the blocks before
it; the blocks are laid from index 0 unless `block_anchor` (an int, or a tensor [batch]) is passed to the
forward (llada-jax's samplers and likelihood lay them from the end of the prompt). attention_type,
block_size and shift_logits are llada-jax fields that the official code does not read.

`attention_mask` ([batch, length], 1 = real token) follows llada-jax rather than the official code: padded
keys are ignored by every query, *and* rotary positions count real tokens only, so a left-padded row gives
the same logits on its real tokens as the unpadded row. (The official code on the Hub ignores attention_mask;
the later variant in the ML-GSAI/LLaDA GitHub repository masks padded keys and counts positions over the
padding, the same up to rounding as rotary positions are relative. Without padding all agree.) A causal
mask counts indices, padding included, so with left padding a real token still sees the real tokens before it;
so do the blocks of a block-causal mask (left padding of a multiple of block_size, or a `block_anchor` moved by
the padding, keeps a row's blocks).

The forward pass returns `MaskedLMOutput(logits=...)` with logits in the parameters' dtype (`hidden_states`
are never shifted); `labels` are not accepted, as the LLaDA loss needs the masking probabilities (see
llada_jax.diffusion).
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_llada import LLaDAConfig


def _sdpa_supports_gqa() -> bool:
    """Whether scaled_dot_product_attention takes `enable_gqa` (torch >= 2.5); else kv heads are repeated."""
    try:
        q = torch.zeros(1, 2, 1, 2)
        k = torch.zeros(1, 1, 1, 2)
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_HAS_GQA = _sdpa_supports_gqa()


class LLaDARMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch, 1, length, head_dim] in float32 for integer positions [batch, length]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in float32, cast back to x's dtype. x: [batch, heads, length, head_dim]."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm LLaMA block (the official `LLaDALlamaBlock` parameters)."""

    def __init__(self, config: LLaDAConfig, layer_id: int):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.effective_n_kv_heads, hd
        m = config.effective_mlp_hidden_size
        depth = 1.0 / math.sqrt(2.0 * (layer_id + 1))
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)  # the official rule
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = _linear(d, self.n_heads * hd, d**-0.5, bias=qkv_bias)
        self.k_proj = _linear(d, self.n_kv_heads * hd, d**-0.5, bias=qkv_bias)
        self.v_proj = _linear(d, self.n_kv_heads * hd, d**-0.5, bias=qkv_bias)
        self.attn_out = _linear(self.n_heads * hd, d, d**-0.5 * depth)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = _linear(d, m, d**-0.5)
        self.up_proj = _linear(d, m, d**-0.5)
        self.ff_out = _linear(m, d, m**-0.5 * depth)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_bias: Optional[torch.Tensor], is_causal: bool = False) -> torch.Tensor:
        b, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = None if key_bias is None else key_bias.to(q.dtype)  # a no-op unless inputs_embeds differ
        if self.n_kv_heads == self.n_heads:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        elif _SDPA_HAS_GQA:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        else:
            group = self.n_heads // self.n_kv_heads
            att = F.scaled_dot_product_attention(
                q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask,
                is_causal=is_causal)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, length, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


def _linear(fan_in: int, fan_out: int, init_std: float, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    layer.llada_init_std = init_std  # read by _init_weights
    return layer


class LLaDAModel(nn.Module):
    """Embedding, blocks, final norm and output head under `transformer.*` (the official module tree)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        d, v = config.d_model, config.padded_vocab_size
        modules = dict(
            wte=nn.Embedding(v, d),
            blocks=nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
            ln_f=LLaDARMSNorm(d, config.rms_norm_eps),
        )
        modules["wte"].llada_init_std = d**-0.5
        if not config.weight_tying:
            modules["ff_out"] = _linear(d, v, d**-0.5)
        self.transformer = nn.ModuleDict(modules)
        self.gradient_checkpointing = False

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, output_hidden_states: bool = False,
                block_anchor: Union[int, torch.Tensor] = 0):
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, length = x.shape[:2]
        causal = self.config.attention_type == "causal"
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the unmasked (faster) attention path
        # Which keys each query may see, bool [batch or 1, 1, 1 or queries, keys]; None: all.
        allowed = None
        if attention_mask is None:
            positions = torch.arange(length, device=x.device)[None].expand(b, length)
        else:
            real = attention_mask.to(device=x.device, dtype=torch.bool)
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            allowed = real[:, None, None, :]
            if causal:
                allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        if self.config.attention_type == "block_causal":
            anchor = torch.as_tensor(block_anchor, device=x.device).reshape(-1, 1, 1, 1)
            index = torch.arange(length, device=x.device)
            # [batch or 1, 1, 1, keys]: each index's block
            blocks = torch.div(index - anchor, self.config.block_size, rounding_mode="floor")
            pairs = blocks <= blocks.transpose(-1, -2)  # key block <= query block
            allowed = pairs if allowed is None else allowed & pairs
        key_bias = None
        if allowed is not None:
            # Additive bias: a large negative number rather than -inf, so a query with no key to see (a row of
            # padding; with a causal mask also a padded query before the first real token) gives uniform
            # attention over all keys instead of NaN. One bias for all masks: two such numbers added would
            # overflow to -inf.
            key_bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            key_bias = key_bias.masked_fill(~allowed, torch.finfo(x.dtype).min)
        is_causal = causal and key_bias is None  # else the causal mask is in key_bias
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        hidden_states = []
        for block in self.transformer.blocks:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x, cos, sin, key_bias, is_causal)
            else:
                x = block(x, cos, sin, key_bias, is_causal)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)  # after the final norm, as the official model returns it
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        if self.config.shift_logits:  # position i from the output at i - 1; a row's first real token keeps its own
            index = torch.arange(length, device=x.device)
            source = torch.where(positions > 0, index - 1, index)
            logits = logits.gather(1, source[..., None].expand(-1, -1, logits.shape[-1]))
        return logits, (tuple(hidden_states) if output_hidden_states else None)


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Truncated normal at 3 sigma with std 1/sqrt(fan_in), output projections also divided by
        sqrt(2 (layer + 1)) (the official "mitchell" initialisation); norms to one."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = getattr(module, "llada_init_std", None)
            if std is None:
                std = module.weight.shape[-1] ** -0.5
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LLaDARMSNorm):
            nn.init.ones_(module.weight)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """`model(input_ids, attention_mask=None) -> MaskedLMOutput(logits [batch, length, embedding_size])`; a
    block_causal model also takes `block_anchor=` (int or [batch]: where its blocks are laid from; default 0)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        for field, wanted in (("block_type", "llama"), ("activation_type", "silu"), ("layer_norm_type", "rms"),
                              ("rope", True)):
            if getattr(config, field, wanted) != wanted:
                raise ValueError(f"{field}={getattr(config, field)!r} is not supported (expected {wanted!r})")
        for field in ("alibi", "include_bias", "attention_layer_norm", "input_emb_norm", "scale_logits"):
            if getattr(config, field, False):
                raise ValueError(f"{field}=True is not supported by this implementation")
        if config.attention_type not in ("bidirectional", "causal", "block_causal"):
            raise ValueError(f"attention_type={config.attention_type!r} is not supported "
                             "(expected 'bidirectional', 'causal' or 'block_causal')")
        block_size = getattr(config, "block_size", None)
        if config.attention_type == "block_causal" and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                                        or block_size <= 0):
            raise ValueError(f"attention_type='block_causal' needs a positive integer block_size, got {block_size!r}")
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Module):
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> Optional[nn.Module]:
        # None when tied: the logits use wte directly, so there is nothing for transformers to tie.
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Module):
        if self.config.weight_tying:
            raise ValueError("weight_tying is set: the output head is the input embedding")
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple, MaskedLMOutput]:
        if kwargs.get("labels") is not None:
            raise ValueError("labels are not supported: the LLaDA loss needs the masking probabilities")
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("this implementation has no key/value cache")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        logits, hidden_states = self.model(input_ids, attention_mask, inputs_embeds, output_hidden_states,
                                           kwargs.get("block_anchor", 0))
        if not return_dict:
            return (logits,) + ((hidden_states,) if hidden_states is not None else ())
        return MaskedLMOutput(logits=logits, hidden_states=hidden_states)
