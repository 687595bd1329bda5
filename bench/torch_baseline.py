"""PyTorch baselines for the benchmarks: the project's own PyTorch LLaDA (`llada_jax/checkpoints/hf_files/
modeling_llada.py`, the file every HF export ships) with the same weights as a JAX model, the LLaDA
pretraining step (forward process, CE / p_mask, / (B * L), clipping, AdamW) and the official per-step sampler.

Nothing here is imported by the package; it is benchmark scaffolding. The sampler is written from the
published algorithm (ML-GSAI/LLaDA `generate.py`: a Python loop over blocks and steps, the model called once
per step, float64 softmax confidence, per-row top-k), temperature 0 only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llada_jax.checkpoints.hf_config import to_hf_config
from llada_jax.checkpoints.hf_files import configuration_llada, modeling_llada
from llada_jax.config import LLaDAConfig


def torch_model(config: LLaDAConfig, state_dict: dict[str, np.ndarray] | None = None,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The project's PyTorch LLaDAModelLM for `config`, loaded with `state_dict` (HF keys, numpy) if given."""
    hf = configuration_llada.LLaDAConfig(**to_hf_config(config, "float32"))
    model = modeling_llada.LLaDAModelLM(hf)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                                                     for k, v in state_dict.items()}, strict=True)
        assert not missing and not unexpected, (missing, unexpected)
    return model.to(dtype)


class PretrainStep:
    """One LLaDA pretraining step in PyTorch, the same computation as `llada_jax.train.step.Trainer`'s:

    forward process (t ~ U(0, 1) per row, p_mask = (1 - eps) t + eps, each token masked with p_mask), logits
    of the noisy batch, sum over masked tokens of CE / p_mask divided by B * L, backward, global-norm clipping
    at `grad_clip`, AdamW (decay on matrices only, not on RMSNorm gains).

    `compile=False` computes the loss as the official code does (cross-entropy of the masked positions only,
    selected by boolean indexing). `compile=True` runs the forward and loss through `torch.compile` (Inductor;
    its backward is compiled by AOTAutograd), with the loss over fixed shapes (`torch.where` instead of
    indexing, so the graph does not depend on the number of masked tokens).
    """

    def __init__(self, model: torch.nn.Module, *, mask_id: int, eps: float = 1e-3, lr: float = 5e-4,
                 betas=(0.9, 0.95), adam_eps: float = 1e-8, weight_decay: float = 0.1, grad_clip: float = 1.0,
                 compile: bool = False, seed: int = 0):
        self.model = model.train()
        self.mask_id, self.eps, self.grad_clip = mask_id, eps, grad_clip
        self.generator = torch.Generator().manual_seed(seed)
        decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight") and "ln_f" not in n]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight") or "ln_f" in n]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:
            self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=adam_eps, fused=True)
            self.optimizer_impl = "fused"
        except (RuntimeError, TypeError):  # a torch without the fused CPU kernel
            self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=adam_eps, foreach=True)
            self.optimizer_impl = "foreach"
        self.compiled = compile
        self._loss = torch.compile(self._fixed_shape_loss, dynamic=False) if compile else self._official_loss

    def _official_loss(self, noisy, ids, masked, p_mask):
        logits = self.model(noisy).logits
        ce = F.cross_entropy(logits[masked], ids[masked], reduction="none") / p_mask[masked]
        return ce.sum() / ids.numel()

    def _fixed_shape_loss(self, noisy, ids, masked, p_mask):
        logits = self.model(noisy).logits
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
        return torch.where(masked, ce / p_mask, 0.0).sum() / ids.numel()

    def noise(self, ids: torch.Tensor):
        b, length = ids.shape
        t = torch.rand(b, generator=self.generator)
        p_mask = ((1.0 - self.eps) * t + self.eps)[:, None].expand(b, length)
        masked = torch.rand(b, length, generator=self.generator) < p_mask
        return torch.where(masked, self.mask_id, ids), masked, p_mask

    def __call__(self, ids: torch.Tensor) -> float:
        noisy, masked, p_mask = self.noise(ids)
        loss = self._loss(noisy, ids, masked, p_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# ----------------------------------------------------------------------------------------------------
# The official sampler's per-step loop (temperature 0, low-confidence or random remasking)
# ----------------------------------------------------------------------------------------------------


def transfer_counts(masked_in_block: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: tokens to commit at each step; masked // steps each, the first masked % steps one more."""
    count = masked_in_block.sum(dim=1, keepdim=True)
    base, rem = count // steps, count % steps
    return base + (torch.arange(steps)[None, :] < rem).long()


@torch.no_grad()
def official_generate(model: torch.nn.Module, prompt: torch.Tensor, *, steps: int, gen_length: int,
                      block_length: int, mask_id: int, cfg_scale: float = 0.0,
                      remasking: str = "low_confidence",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """The official semi-autoregressive sampler at temperature 0 (block_length = gen_length: one block).

    Returns (ids [B, P + G], number of model calls)."""
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    assert gen_length % block_length == 0 and steps % num_blocks == 0
    per_block = steps // num_blocks
    calls = 0
    for nb in range(num_blocks):
        block_end = plen + (nb + 1) * block_length
        counts = transfer_counts(x[:, block_end - block_length:block_end] == mask_id, per_block)
        for i in range(per_block):
            masked = x == mask_id
            if cfg_scale > 0:  # unconditional input: the prompt masked; both halves in one batch
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond, un = torch.chunk(model(torch.cat([x, un_x])).logits, 2, dim=0)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x).logits
            calls += 1
            x0 = torch.argmax(logits, dim=-1)  # temperature 0: no Gumbel noise
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                conf = torch.gather(p, -1, x0[..., None])[..., 0]
            else:
                conf = torch.rand(x0.shape, generator=generator, dtype=torch.float64)
            conf[:, block_end:] = -np.inf
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, -np.inf)
            commit = torch.zeros_like(masked)
            for row in range(b):
                _, picked = torch.topk(conf[row], k=int(counts[row, i]))
                commit[row, picked] = True
            x[commit] = x0[commit]
    return x, calls
