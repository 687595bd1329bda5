"""Analysis tools (`ModelAnalyzer`): attention maps with heatmaps, and a sampler comparison table.

    analyzer = ModelAnalyzer(output_dir="analysis")
    maps = analyzer.analyze_attention_patterns(model, input_ids)        # float32 [layers, B, heads, L, L]
    rows = analyzer.compare_sampling_methods(model, dataset, settings)  # list of dicts, one per setting
    print(format_table(rows))

`attention_maps` runs the blocks one after the other with the model's own code: each layer's queries and keys
come from `LLaDABlock.qkv` (its norm and projections) and the model's RoPE, and the map is
softmax(q k^T / sqrt(head_dim)) over the keys the model attends to (padding, attention_mask 0, gets 0), in
float32; grouped-query heads use their shared key head. The blocks' outputs come from the blocks themselves.

`compare_sampling_methods(model, dataset, settings)`: `dataset` is a list of (prompt_ids, answer) pairs where
the answer is token ids or text; `settings` a list of dicts of `create_sampler` options (`method` plus any of
gen_length, block_length, steps, temperature, cfg_scale, remasking, threshold, cache, cache_refresh, ...;
an optional `name`). Every setting samples every prompt (batches of `batch_size`, prompts left-padded to one
common length so each setting compiles once, before timing) and gives a row:

    name, method, remasking, threshold, cache, cache_refresh, steps, gen_length, block_length, cfg_scale,
    temperature, examples, accuracy (exact match, in [0, 1]), nfe (mean model evaluations per example),
    seconds (sampling time, compile excluded), tokens_per_s (examples x gen_length / seconds)

Exact match: the generated tokens are cut at the first EOS (or end-of-turn, when a tokenizer names one);
id answers are compared as token lists (the reference's trailing EOS removed), text answers as the decoded
text without special tokens, stripped of surrounding whitespace on both sides.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.config import padding_token_id
from llada_jax.model import apply_rope


def attention_maps(model, input_ids, attention_mask=None) -> np.ndarray:
    """Attention probabilities of every layer and head: float32 [n_layers, B, n_heads, L, L] (query, key)."""
    ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
    if ids.ndim == 1:
        ids = ids[None]
    mask = None if attention_mask is None else jnp.asarray(np.asarray(attention_mask), jnp.int32).reshape(ids.shape)
    graphdef, state = nnx.split(model)
    return np.asarray(_maps_program(graphdef, state, ids, mask))


def _layer_blocks(model):
    """The model's blocks as a list of `LLaDABlock`s (stacked parameters split per layer when scanned)."""
    if not model.config.scan_layers:
        return list(model.blocks)
    graphdef, params = nnx.split(model.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], params)) for i in range(model.config.n_layers)]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _maps_program(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    c = model.config
    cos, sin, key_mask = model.rope_and_key_mask(mask, *ids.shape)
    pairs = model.visible_keys(jnp.arange(ids.shape[1]), ids.shape[1])  # causal models: [L, L]; else None
    group = c.n_heads // c.effective_n_kv_heads
    x = model.embed(ids)
    maps = []
    for block in _layer_blocks(model):
        q, k, _ = block.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = jnp.repeat(k, group, axis=2)  # the key head of each query head
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(c.head_dim)
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
        if pairs is not None:
            scores = jnp.where(pairs[None, None], scores, -jnp.inf)
        maps.append(jax.nn.softmax(scores, axis=-1))
        x = block(x, cos, sin, key_mask, pairs)
    return jnp.stack(maps)


def save_heatmaps(maps: np.ndarray, output_dir: str, *, example: int = 0, tokens: list[str] | None = None,
                  max_heads: int | None = None) -> list[str]:
    """One PNG per layer (`layer_XX.png`, a grid of its heads) of one example's maps [layers, B, heads, L, L].
    Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    n_layers, _, n_heads, length, _ = maps.shape
    heads = n_heads if max_heads is None else min(n_heads, max_heads)
    cols = min(heads, 4)
    rows = -(-heads // cols)
    paths = []
    for layer in range(n_layers):
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= heads:
                ax.axis("off")
                continue
            ax.imshow(maps[layer, example, h], cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.set_title(f"head {h}", fontsize=8)
            if tokens is not None and length <= 48:
                ax.set_xticks(range(length), tokens, rotation=90, fontsize=5)
                ax.set_yticks(range(length), tokens, fontsize=5)
            else:
                ax.set_xlabel("key", fontsize=7)
                ax.set_ylabel("query", fontsize=7)
        fig.suptitle(f"layer {layer}: attention probabilities (query rows, key columns)")
        fig.tight_layout()
        path = os.path.join(output_dir, f"layer_{layer:02d}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------
# Sampler comparison
# ----------------------------------------------------------------------------------------------------

def default_settings(gen_length: int = 64, block_length: int = 16, threshold: float = 0.9) -> list[dict]:
    """The standard comparison: the one-token-per-step semi-autoregressive sampler, threshold decoding, and
    threshold decoding with each cache."""
    base = dict(gen_length=gen_length, block_length=block_length, steps=gen_length)
    return [
        dict(name="semi_ar (1 token/step)", method="semi_ar_padding", **base),
        dict(name="semi_ar (2 tokens/step)", method="semi_ar_padding", **{**base, "steps": gen_length // 2}),
        dict(name=f"threshold {threshold}", method="semi_ar_padding", threshold=threshold, **base),
        dict(name=f"threshold {threshold} + prefix cache", method="semi_ar_padding", threshold=threshold,
             cache="prefix", **base),
        dict(name=f"threshold {threshold} + dual cache", method="semi_ar_padding", threshold=threshold,
             cache="dual", **base),
    ]


def _cut(ids, stop_ids) -> list[int]:
    out = []
    for t in ids:
        if int(t) in stop_ids:
            break
        out.append(int(t))
    return out


def compare_sampling_methods(model, dataset, settings: list[dict] | None = None, *, tokenizer=None,
                             batch_size: int = 8, seed: int = 0) -> list[dict]:
    """Accuracy, NFE and tokens/s of each sampler setting on `dataset` (see the module docstring)."""
    from llada_jax.sampling import create_sampler
    from llada_jax.sampling import prompts as prompt_io
    from llada_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer  # or any .decode / .eot_id
    settings = default_settings() if settings is None else settings
    prompts = [list(map(int, np.asarray(p).tolist())) for p, _ in dataset]
    answers = [a for _, a in dataset]
    if not prompts:
        raise ValueError("dataset: no examples")
    if any(isinstance(a, str) for a in answers) and tokenizer is None:
        raise ValueError("dataset: text answers need a tokenizer (pass tokenizer=)")
    config = model.config
    eos = config.eos_token_id
    eot = getattr(tokenizer, "eot_id", None)
    stop_ids = {eos} | ({eot} if eot is not None else set())
    rows = []
    for setting in settings:
        options = dict(setting)
        name = options.pop("name", None)
        method = options.pop("method", "semi_ar_padding")
        sampler = create_sampler(method, **options)
        opts = sampler.options
        width = prompt_io.padded_length(max(map(len, prompts)), prompt_io.LENGTH_BUCKET,
                                        config.max_sequence_length - opts.gen_length)
        batches = []
        for b in range(0, len(prompts), batch_size):
            chunk = prompts[b:b + batch_size]
            ids, mask = prompt_io.left_pad(chunk, padding_token_id(config), width, rows=batch_size)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
                np.minimum(np.arange(b, b + batch_size), len(prompts) - 1).astype(np.uint32))
            batches.append((len(chunk), ids, mask, keys))
        jax.block_until_ready(sampler(model, batches[0][1], batches[0][2], rng=batches[0][3]))  # compile
        outputs, nfe = [], []
        start = time.perf_counter()
        for n, ids, mask, keys in batches:
            out, stats = sampler(model, ids, mask, rng=keys, return_stats=True)
            out = np.asarray(out)  # waits for the result
            outputs.extend(out[:n, width:])
            nfe.extend(np.asarray(stats.nfe)[:n].tolist())
        seconds = time.perf_counter() - start
        correct = 0
        for generated, answer in zip(outputs, answers):
            got = _cut(generated, stop_ids)
            if isinstance(answer, str):
                correct += tokenizer.decode(got, skip_special_tokens=True).strip() == answer.strip()
            else:
                want = list(map(int, np.asarray(answer).tolist()))
                while want and want[-1] in stop_ids:
                    want.pop()
                correct += got == want
        resolved = opts.resolved(config)  # the defaults that depend on the model (block_diffusion's cache, blocks)
        rows.append(dict(
            name=name or method, method=method, remasking=opts.remasking, threshold=opts.threshold,
            cache=resolved.cache, cache_refresh=opts.cache_refresh,
            steps=None if opts.threshold is not None else opts.steps,
            gen_length=opts.gen_length, block_length=resolved.layout.block_length, cfg_scale=opts.cfg_scale,
            temperature=opts.temperature, examples=len(prompts), accuracy=correct / len(prompts),
            nfe=float(np.mean(nfe)), seconds=seconds, tokens_per_s=len(prompts) * opts.gen_length / seconds))
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `compare_sampling_methods` rows."""
    head = "| setting | accuracy | NFE | tokens/s | seconds |\n|---|---:|---:|---:|---:|"
    lines = [f"| {r['name']} | {100 * r['accuracy']:.1f}% | {r['nfe']:.1f} | {r['tokens_per_s']:.1f} | "
             f"{r['seconds']:.2f} |" for r in rows]
    return "\n".join([head, *lines])


class ModelAnalyzer:
    """Attention heatmaps and sampler comparisons, written under `output_dir`."""

    def __init__(self, output_dir: str = "analysis"):
        self.output_dir = output_dir

    def analyze_attention_patterns(self, model, input_ids, attention_mask=None, *, save_plots: bool = True,
                                   tokenizer=None, example: int = 0, max_heads: int | None = None) -> np.ndarray:
        """Attention maps float32 [n_layers, B, n_heads, L, L]; with `save_plots`, one heatmap PNG per layer of
        example `example` in `output_dir/attention/` (token labels from `tokenizer` for short inputs)."""
        maps = attention_maps(model, input_ids, attention_mask)
        if save_plots:
            tokens = None
            if tokenizer is not None:
                from llada_jax.tokenizer import load_tokenizer

                helper = load_tokenizer(tokenizer)
                ids = np.asarray(input_ids).reshape(maps.shape[1], -1)[example]
                tokens = [helper.decode([int(t)]) for t in ids]
            self.last_plots = save_heatmaps(maps, os.path.join(self.output_dir, "attention"), example=example,
                                            tokens=tokens, max_heads=max_heads)
        return maps

    def compare_sampling_methods(self, model, dataset, settings: list[dict] | None = None, **kwargs) -> list[dict]:
        """`compare_sampling_methods` (module function); also writes `output_dir/sampling_comparison.json`."""
        from llada_jax.checkpoints.atomic import write_json

        rows = compare_sampling_methods(model, dataset, settings, **kwargs)
        write_json(os.path.join(self.output_dir, "sampling_comparison.json"), rows)
        return rows
