"""An independent, step-by-step reference of the official LLaDA sampler (temperature 0), in PyTorch.

Written from the published algorithm (ML-GSAI/LLaDA generate.py), sharing no code with llada_jax.sampling:
plain Python loops over blocks, steps and rows, torch.softmax / torch.topk, and the model called once per
step through `logits_fn(ids, attention_mask) -> numpy [B, L, V]`. `reference_origin` grows the sequence
block by block for real (no hidden buffer) to check the fixed-shape semi_ar_origin implementation.
`reference_block_diffusion` decodes a block-causal model block by block from the whole sequence at every step
(no cache), with the schedule or a confidence threshold, stopping after the first block with EOS.
`reference_llada2` is LLaDA 2.x's published generate() (inclusionAI modeling_llada2_moe.py): blocks laid from
position 0, threshold decoding, and LLaDA 2.1's token editing with its post-fill steps.
"""

from __future__ import annotations

import numpy as np
import torch

NEG_INF = float("-inf")


def _schedule(count: int, steps: int) -> list[int]:
    base, rem = divmod(count, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _logits(logits_fn, x, attn, prompt_index, cfg_scale, mask_id):
    if cfg_scale > 0:
        un_x = x.clone()
        un_x[prompt_index] = mask_id
        both = torch.cat([x, un_x])
        both_attn = None if attn is None else torch.cat([attn, attn])
        out = torch.from_numpy(np.array(logits_fn(both.numpy(), None if both_attn is None else both_attn.numpy())))
        cond, un = torch.chunk(out, 2, dim=0)
        return un + (cfg_scale + 1) * (cond - un)
    return torch.from_numpy(np.array(logits_fn(x.numpy(), None if attn is None else attn.numpy())))


def reference_generate(logits_fn, prompt, attention_mask=None, *, steps, gen_length, block_length, mask_id,
                       cfg_scale=0.0, eos_id=None, eot_id=None, logits_eos_inf=False,
                       confidence_eos_eot_inf=False, history=None):
    """The official algorithm at temperature 0 with low-confidence remasking. Returns int64 [B, P + G]."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.int64)
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.int64)
    x[:, :plen] = prompt
    attn = None
    if attention_mask is not None:
        attn = torch.cat([torch.as_tensor(np.asarray(attention_mask), dtype=torch.int64),
                          torch.ones((b, gen_length), dtype=torch.int64)], dim=1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    per_block = steps // num_blocks
    for nb in range(num_blocks):
        lo, hi = plen + nb * block_length, plen + (nb + 1) * block_length
        counts = (x[:, lo:hi] == mask_id).sum(dim=1).tolist()
        plan = [_schedule(c, per_block) for c in counts]
        for i in range(per_block):
            masked = x == mask_id
            logits = _logits(logits_fn, x, attn, prompt_index, cfg_scale, mask_id)
            if logits_eos_inf:
                logits[:, :, eos_id] = NEG_INF
            x0 = torch.argmax(logits, dim=-1)
            if confidence_eos_eot_inf:  # after x0, as the official code does at temperature 0
                logits[:, :, eos_id] = NEG_INF
                if eot_id is not None:
                    logits[:, :, eot_id] = NEG_INF
            p = torch.softmax(logits.float(), dim=-1)
            conf = torch.gather(p, -1, x0[..., None])[..., 0]
            conf[:, hi:] = NEG_INF
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, torch.full_like(conf, NEG_INF))
            for row in range(b):
                _, picked = torch.topk(conf[row], k=plan[row][i])
                x[row, picked] = x0[row, picked]
            if history is not None:
                history.append(x.clone().numpy())
    return x.numpy()


def reference_origin(logits_fn, prompt, *, steps, gen_length, block_length, mask_id, eos_id, cfg_scale=0.0):
    """semi-autoregressive origin for ONE unpadded prompt [1, P]: start with one block of masks, decode it,
    stop if it holds EOS, else append the next block. Returns (ids [1, P + G] with EOS after the first EOS
    and in never-decoded positions, number of blocks decoded)."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.int64)
    assert prompt.shape[0] == 1
    plen = prompt.shape[1]
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    x = prompt.clone()
    prompt_index = None
    decoded = 0
    for nb in range(num_blocks):
        x = torch.cat([x, torch.full((1, block_length), mask_id, dtype=torch.int64)], dim=1)
        prompt_index = torch.zeros_like(x, dtype=torch.bool)
        prompt_index[:, :plen] = prompt != mask_id
        lo = plen + nb * block_length
        plan = _schedule(int((x[0, lo:] == mask_id).sum()), per_block)
        for i in range(per_block):
            masked = x == mask_id
            logits = _logits(logits_fn, x, None, prompt_index, cfg_scale, mask_id)
            x0 = torch.argmax(logits, dim=-1)
            conf = torch.gather(torch.softmax(logits.float(), dim=-1), -1, x0[..., None])[..., 0]
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, torch.full_like(conf, NEG_INF))
            _, picked = torch.topk(conf[0], k=plan[i])
            x[0, picked] = x0[0, picked]
        decoded += 1
        if (x[0, lo:] == eos_id).any():
            break
    out = torch.full((1, plen + gen_length), eos_id, dtype=torch.int64)
    out[:, : x.shape[1]] = x
    gen = out[0, plen:]
    hits = (gen == eos_id).nonzero()
    if len(hits):
        gen[int(hits[0]):] = eos_id
    return out.numpy(), decoded


def reference_block_diffusion(logits_fn, prompt, *, steps, gen_length, block_size, mask_id, eos_id, cfg_scale=0.0,
                              threshold=None):
    """Block diffusion for ONE unpadded prompt [1, P] (temperature 0, low-confidence remasking). Every step calls
    `logits_fn(ids, None)` on the whole sequence, the prompt then gen_length masks (a block-causal model with its
    blocks laid from P: nothing after the current block is visible). Block b decodes its own masks only, with
    steps // num_blocks steps of the linear schedule, or with a `threshold` until none is left (every mask whose
    confidence reaches it, and always the most confident); decoding stops after the first block that contains
    EOS. Returns (ids [1, P + G] with EOS after the first generated EOS and at never-decoded positions, the number
    of steps run)."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.int64)
    assert prompt.shape[0] == 1 and gen_length % block_size == 0
    plen = prompt.shape[1]
    num_blocks = gen_length // block_size
    per_block = block_size if threshold is not None else steps // num_blocks
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id, dtype=torch.int64)], dim=1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :plen] = prompt != mask_id
    run = 0
    for nb in range(num_blocks):
        lo, hi = plen + nb * block_size, plen + (nb + 1) * block_size
        plan = _schedule(int((x[0, lo:hi] == mask_id).sum()), per_block)
        for i in range(per_block):
            if threshold is not None and not (x[0, lo:hi] == mask_id).any():
                break
            logits = _logits(logits_fn, x, None, prompt_index, cfg_scale, mask_id)[0, lo:hi]
            x0 = torch.argmax(logits, dim=-1)
            conf = torch.gather(torch.softmax(logits.float(), dim=-1), -1, x0[:, None])[:, 0]
            masked = x[0, lo:hi] == mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, NEG_INF))
            if threshold is None:
                picked = torch.topk(conf, k=plan[i]).indices
            else:
                picked = ((conf >= threshold) & masked).nonzero()[:, 0].tolist() + [int(torch.argmax(conf))]
            x[0, lo:hi][picked] = x0[picked]
            run += 1
        if (x[0, lo:hi] == eos_id).any():
            break
    gen = x[0, plen:]
    hits = ((gen == eos_id) | (gen == mask_id)).nonzero()
    if len(hits):
        gen[int(hits[0]):] = eos_id
    return x.numpy(), run


def reference_llada2(logits_fn, prompt, *, gen_length, block_size, mask_id, eos_id, threshold=0.95,
                     editing_threshold=None, max_post_steps=16, cfg_scale=0.0):
    """LLaDA 2.x's published generate() for ONE unpadded prompt [1, P] (temperature 0), step by step, as the
    inclusionAI modeling code writes it: a buffer of ceil((P + G) / block_size) whole blocks laid from position 0,
    the prompt then masks; blocks from the one that holds the prompt's tail (P // block_size) on. Each step calls
    `logits_fn(ids, None)` on the whole buffer (a block-causal model with its blocks laid from 0: nothing after
    the current block is visible) and reads the block: x0 = argmax, p = softmax probability of x0. Masks of the
    block with p >= threshold are committed, always at least the most confident one (the published code takes
    p > threshold; the two differ only when a probability equals the threshold exactly). With
    `editing_threshold` (LLaDA 2.1), the same step replaces every committed non-prompt token of the block whose
    x0 differs with p > editing_threshold, and once the block has no mask left a step is taken only while fewer
    than `max_post_steps` such steps have run and the previous one edited something (at most block_size +
    max_post_steps steps a block). After a block, decoding stops if the generated part holds EOS (LLaDA 2.0's
    check). Returns (ids [1, P + G] with EOS after the first generated EOS and at never-decoded positions, the
    number of steps run)."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.int64)
    assert prompt.shape[0] == 1
    plen = prompt.shape[1]
    num_blocks = -(-(plen + gen_length) // block_size)
    x = torch.full((1, num_blocks * block_size), mask_id, dtype=torch.int64)
    x[:, :plen] = prompt
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :plen] = prompt != mask_id
    post_limit = 0 if editing_threshold is None else max_post_steps
    run = 0
    for nb in range(plen // block_size, num_blocks):
        lo, hi = nb * block_size, (nb + 1) * block_size
        in_prompt = torch.arange(lo, hi) < plen  # the prompt's tail, in the first decoded block
        post = 0
        for _ in range(block_size + post_limit):
            old = x[0, lo:hi].clone()
            masked = (old == mask_id) & ~in_prompt
            if not masked.any():
                post += 1
            if post > post_limit:
                break
            logits = _logits(logits_fn, x, None, prompt_index, cfg_scale, mask_id)[0, lo:hi]
            x0 = torch.argmax(logits, dim=-1)
            p = torch.gather(torch.softmax(logits.float(), dim=-1), -1, x0[:, None])[:, 0]
            fill = torch.zeros_like(masked)
            if masked.any():
                conf = torch.where(masked, p, torch.full_like(p, NEG_INF))
                fill = (conf >= threshold) & masked
                fill[int(torch.argmax(conf))] = True
            edit = torch.zeros_like(masked)
            if editing_threshold is not None:
                edit = ~masked & ~in_prompt & (x0 != old) & (p > editing_threshold)
            x[0, lo:hi] = torch.where(fill | edit, x0, old)
            run += 1
            if not masked.any() and not edit.any():
                break
        if (x[0, plen:hi] == eos_id).any():
            break
    out = x[:, :plen + gen_length].clone()
    gen = out[0, plen:]
    hits = ((gen == eos_id) | (gen == mask_id)).nonzero()
    if len(hits):
        gen[int(hits[0]):] = eos_id
    return out.numpy(), run
