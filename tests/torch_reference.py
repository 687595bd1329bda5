"""An independent PyTorch implementation of the LLaDA forward pass, written from the architecture facts.

It shares no code with llada_jax: weights come in as plain numpy arrays in the official PyTorch layout
(Linear weights [out, in]), attention is computed with explicit matrices, and GQA repeats kv heads.
The config.json fields of converted autoregressive models are followed too: q/k/v biases (present in `weights`
when `include_qkv_bias`), `attention_type` "causal" (query i sees keys j <= i, by index), "block_causal" with
`block_size` (query i sees key j when j's block is not after i's, index i in block (i - block_anchor) //
block_size) and `shift_logits` (position i takes the logits computed at i - 1, a row's first real token its own).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def llada_logits(weights: dict[str, np.ndarray], cfg: dict, input_ids: np.ndarray,
                 attention_mask: np.ndarray | None = None, attention_probs: list | None = None,
                 block_anchor=0) -> np.ndarray:
    """Logits [B, L, V] for HF-named `weights` (e.g. "model.transformer.blocks.0.q_proj.weight").
    `attention_probs`, a list, receives each layer's attention probabilities [B, heads, L, L] (numpy).
    A query with no key to see (a padded one before the first real token of a causal row) attends
    uniformly to every key. `block_anchor` (int or one per row): where a block_causal model's blocks start."""
    W = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}
    ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    b, length = ids.shape
    d, n_heads = cfg["d_model"], cfg["n_heads"]
    n_kv = cfg.get("n_kv_heads") or n_heads
    hd = d // n_heads
    eps = cfg["rms_norm_eps"]
    if attention_mask is None:
        attention_mask = np.ones((b, length), np.int64)
    mask = torch.from_numpy(np.asarray(attention_mask, np.int64))
    positions = (torch.cumsum(mask, -1) - 1).clamp(min=0).double()

    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = positions[..., None] * inv_freq  # [B, L, hd/2]
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]  # [B, 1, L, hd]

    p = "model.transformer."
    x = W[p + "wte.weight"][ids]
    allowed = mask.bool()[:, None, None, :]  # [B, 1, 1 or L, L]
    if cfg.get("attention_type", "bidirectional") == "causal":
        allowed = allowed & (torch.arange(length)[None, :] <= torch.arange(length)[:, None])
    elif cfg.get("attention_type") == "block_causal":
        sees = []
        for anchor in np.broadcast_to(np.asarray(block_anchor), (b,)):
            block = [(i - int(anchor)) // cfg["block_size"] for i in range(length)]  # Python floor division
            sees.append(torch.tensor([[block[j] <= block[i] for j in range(length)] for i in range(length)]))
        allowed = allowed & torch.stack(sees)[:, None]
    else:
        assert cfg.get("attention_type", "bidirectional") == "bidirectional", cfg["attention_type"]

    def proj(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    for i in range(cfg["n_layers"]):
        q_ = f"{p}blocks.{i}."
        h = rms_norm(x, W[q_ + "attn_norm.weight"], eps)
        q = proj(h, q_ + "q_proj").view(b, length, n_heads, hd).transpose(1, 2)
        k = proj(h, q_ + "k_proj").view(b, length, n_kv, hd).transpose(1, 2)
        v = proj(h, q_ + "v_proj").view(b, length, n_kv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~allowed, -1e30)
        probs = torch.softmax(scores, dim=-1)
        if attention_probs is not None:
            attention_probs.append(probs.numpy())
        att = probs @ v
        att = att.transpose(1, 2).reshape(b, length, d)
        x = x + att @ W[q_ + "attn_out.weight"].T
        h = rms_norm(x, W[q_ + "ff_norm.weight"], eps)
        act = torch.nn.functional.silu(h @ W[q_ + "ff_proj.weight"].T) * (h @ W[q_ + "up_proj.weight"].T)
        x = x + act @ W[q_ + "ff_out.weight"].T
    x = rms_norm(x, W[p + "ln_f.weight"], eps)
    head = W[p + "wte.weight"] if cfg.get("weight_tying") else W[p + "ff_out.weight"]
    logits = x @ head.T
    if cfg.get("shift_logits"):  # a row's first real token (position 0) keeps its own logits
        rows = []
        for r in range(b):
            source = [i if positions[r, i] == 0 else i - 1 for i in range(length)]
            rows.append(logits[r, source])
        logits = torch.stack(rows)
    return logits.numpy()
