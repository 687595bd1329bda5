"""lm-evaluation-harness model `llada_jax`: `loglikelihood` (the Monte Carlo estimator and the greedy check of
`llada_jax.eval.likelihood`) and `generate_until` (the jitted samplers, every sampler option as a model arg).

lm-eval (0.4.x) finds models only in its own registry, filled when a module with `@register_model` is imported;
it does not load third-party plugins. So run it through this module, which registers `llada_jax` and then
starts lm-eval's own command line (any lm-eval arguments):

    python -m llada_jax.eval.lm_eval_adapter --model llada_jax \\
        --model_args pretrained=RUN_DIR,mc_num=128,gen_length=256,block_length=32,steps=256 \\
        --tasks hellaswag --batch_size 16
    llada-jax-lm-eval ...          (the same, installed as a console script)

or, from Python, `import llada_jax.eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model="llada_jax", ...)`.

Model args (`--model_args k=v,...`):
    pretrained        Orbax checkpoint or HF model directory with its tokenizer (required)
    dtype             compute and parameter dtype (default: as stored)
    merge_lora        a LoRA run as `pretrained`: fold the adapters into the weights at load (default False)
    mc_num            Monte Carlo samples per loglikelihood request (default 128)
    cfg / cfg_scale   classifier-free guidance for both request types (default 0)
    is_check_greedy   also run the greedy check (the official `suffix_greedy_prediction`, L model calls per
                      request; default False, as the official code recommends)
    examples_per_call loglikelihood requests per jitted call (default 8)
    mesh_data, mesh_fsdp, mesh_tensor
                      the device mesh over every device of every process (as `--mesh` of `sample`; default:
                      every device on data); the parameters are sharded by the logical-axis rules. Launched as
                      several processes (launch/local_multiprocess.sh, SLURM, a TPU pod), every process runs every
                      request and process 0 writes lm-eval's results
    seed              random seed of the estimator and of sampling (default 1234)
    gen_batch_size    prompts per sampler call in generate_until (default 8)
    sampling_method (or method), gen_length, block_length, steps, temperature, remasking (or
    remasking_strategy), threshold, editing_threshold, max_post_steps, cache, cache_refresh, logits_eos_inf,
    confidence_eos_eot_inf
                      the sampler options of `create_sampler` (defaults as there; a block_causal model's
                      default method is block_diffusion, sampling_method=llada2 decodes as LLaDA 2.x's generate())
lm-eval's `--batch_size` is the Monte Carlo batch (samples sharing one stratified draw), as in the official
eval_llada.py; `mc_num` must be a multiple of it ("auto": 16).

Text handling follows the official harness: a (context, continuation) pair is encoded with `encode_pair`;
generation prompts are encoded with the tokenizer's special tokens (BOS) unless the text already starts with
BOS (a chat template), the answer is decoded with special tokens, cut at the first stop string of `until`, and
returned without special tokens. Other generation kwargs of a task (max_gen_toks, temperature, do_sample) are
ignored: the model args fix the sampler, as in the official harness. `loglikelihood_rolling` is not supported
(as in the official code).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
import numpy as np
from lm_eval.api import registry
from lm_eval.api.model import LM
from tqdm import tqdm

from llada_jax import sharding
from llada_jax.config import padding_token_id

log = logging.getLogger(__name__)

_SAMPLER_ARGS = {"sampling_method": "method", "method": "method", "gen_length": "gen_length",
                 "block_length": "block_length", "steps": "steps", "temperature": "temperature",
                 "remasking": "remasking", "remasking_strategy": "remasking", "threshold": "threshold",
                 "editing_threshold": "editing_threshold", "max_post_steps": "max_post_steps",
                 "cache": "cache", "cache_refresh": "cache_refresh", "logits_eos_inf": "logits_eos_inf",
                 "confidence_eos_eot_inf": "confidence_eos_eot_inf"}


class LLaDAJaxLM(LM):
    """A LLaDA model for lm-eval. See the module docstring for the arguments."""

    def __init__(self, pretrained: str | None = None, dtype: str | None = None, mc_num: int = 128,
                 batch_size: int | str | None = 16, cfg: float = 0.0, cfg_scale: float | None = None,
                 is_check_greedy: bool = False, examples_per_call: int = 8, seed: int = 1234,
                 gen_batch_size: int = 8, model=None, tokenizer=None, device=None, max_batch_size=None,
                 mesh_data: int | None = None, mesh_fsdp: int | None = None, mesh_tensor: int | None = None,
                 merge_lora: bool = False, **sampler_args):
        super().__init__()
        from llada_jax.sampling import create_sampler
        from llada_jax.tokenizer import TokenizerHelper, load_tokenizer

        unknown = sorted(set(sampler_args) - set(_SAMPLER_ARGS))
        if unknown:
            raise ValueError(f"llada_jax: unknown model arg(s) {unknown}; sampler args: {sorted(_SAMPLER_ARGS)}")
        source = None  # the model's config file, when it is loaded from `pretrained`
        if model is None:
            if pretrained is None:
                raise ValueError("llada_jax: give pretrained=PATH (an Orbax checkpoint or HF model directory)")
            from llada_jax import distributed
            from llada_jax.checkpoints import load_on_mesh

            distributed.start(argparse.Namespace())  # several processes: from the LLADA_JAX_* / SLURM / TPU set-up
            sizes = {"data": mesh_data, "fsdp": mesh_fsdp, "tensor": mesh_tensor}
            mesh_flag = ",".join(f"{axis}={int(n)}" for axis, n in sizes.items() if n is not None)
            model, stored, self.mesh = load_on_mesh(pretrained, mesh_flag or None, dtype=dtype,
                                                    merge_lora=merge_lora in (True, "true", "True", "1", 1))
            tokenizer = stored if tokenizer is None else tokenizer
            source = pretrained
        else:
            self.mesh = None
        self.model = model
        self.helper = load_tokenizer(tokenizer) if not isinstance(tokenizer, TokenizerHelper) else tokenizer
        if self.helper is None:
            raise ValueError(f"llada_jax: no tokenizer is stored with {pretrained}; pass tokenizer=DIR")
        self.tokenizer = self.helper.tokenizer  # lm-eval logs its special tokens
        self.mc_num = int(mc_num)
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") \
            else int(batch_size)
        self.cfg = float(cfg if cfg_scale is None else cfg_scale)
        self.is_check_greedy = bool(is_check_greedy)
        self.examples_per_call = int(examples_per_call)
        self.seed = int(seed)
        self.gen_batch_size = int(gen_batch_size)
        options = {_SAMPLER_ARGS[k]: v for k, v in sampler_args.items()}
        # the default method fits the model: block_diffusion for a block-causal one
        method = options.pop("method", "block_diffusion" if self.model.config.attention_type == "block_causal"
                             else "semi_ar_padding")
        from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES

        self.rules = DEFAULT_LOGICAL_AXIS_RULES
        self.sampler = create_sampler(method, cfg_scale=self.cfg, eot_id=self.helper.eot_id, mesh=self.mesh,
                                      rules=self.rules if self.mesh is not None else None, **options)
        # Every process of a mesh runs every request (the model is spread over all of them), so lm-eval must not
        # split the requests over processes: to lm-eval each process is rank 0 of 1 (`main` keeps the other
        # processes from writing results).
        self.sampler.options.resolved(self.model.config)  # token ids fit the model: fail now, not mid-run
        try:
            padding_token_id(self.model.config)  # generate_until left-pads its prompts
        except ValueError as e:
            from llada_jax.checkpoints import layout

            where = f"{layout.model_config_file(source)}: " if source is not None else ""
            raise ValueError(f"llada_jax: {where}{e}") from e
        if self.mc_num % self.batch_size:
            raise ValueError(f"llada_jax: mc_num {self.mc_num} must be a multiple of the batch size "
                             f"{self.batch_size} (lm-eval's --batch_size is the Monte Carlo batch)")

    @property
    def tokenizer_name(self) -> str:
        return str(self.helper.path).replace("/", "__")

    @property
    def max_length(self) -> int:
        return self.model.config.max_sequence_length

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.helper.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False):
        return self.helper.chat_template if chat_template else None

    # --- requests --------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from llada_jax.eval.likelihood import encode_pair, greedy_check, log_likelihood

        prompts, answers = [], []
        for request in requests:
            prompt, answer = encode_pair(self.helper, *request.args)
            room = self.max_length - len(answer)
            if len(prompt) > room:  # keep the end of the context, as lm-eval's own models do
                log.warning("llada_jax: a context of %d tokens is cut to its last %d", len(prompt), max(room, 0))
                prompt = prompt[len(prompt) - max(room, 0):]
            prompts.append(prompt)
            answers.append(answer)
        out_ll = np.zeros(len(requests))
        out_greedy = np.zeros(len(requests), bool)
        chunk = max(self.examples_per_call * 8, 1)  # progress in chunks; keys by request index
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(self.seed), i))(np.arange(len(requests)))
        for start in tqdm(range(0, len(requests), chunk), desc="loglikelihood", disable=disable_tqdm):
            part = slice(start, start + chunk)
            on = dict(examples_per_call=self.examples_per_call, mesh=self.mesh, rules=self.rules)
            out_ll[part] = log_likelihood(self.model, prompts[part], answers[part], self.mc_num, self.batch_size,
                                          self.cfg, rng=keys[part], **on)
            if self.is_check_greedy:
                out_greedy[part] = greedy_check(self.model, prompts[part], answers[part], self.cfg, **on)
        results = [(float(ll), bool(g)) for ll, g in zip(out_ll, out_greedy)]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("llada_jax: loglikelihood_rolling (perplexity) is not supported by the masked-"
                                  "diffusion likelihood estimator (as in the official LLaDA harness)")

    def generate_until(self, requests, disable_tqdm: bool = False):
        from llada_jax.sampling import prompts as prompt_io

        config = self.model.config
        gen_length = self.sampler.options.gen_length
        limit = config.max_sequence_length - gen_length
        encoded, stops = [], []
        for request in requests:
            context, gen_kwargs = request.args
            bos = self.helper.tokenizer.bos_token
            ids = self.helper.encode(context, add_special_tokens=not (bos and context.startswith(bos)))
            if len(ids) > limit:
                log.warning("llada_jax: a prompt of %d tokens is cut to its last %d", len(ids), limit)
                ids = ids[len(ids) - limit:]
            encoded.append(ids)
            until = (gen_kwargs or {}).get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
        outputs: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        base = jax.random.key(self.seed)
        for b in tqdm(range(0, len(order), self.gen_batch_size), desc="generate_until", disable=disable_tqdm):
            rows = order[b:b + self.gen_batch_size]
            length = prompt_io.padded_length(max(len(encoded[i]) for i in rows), prompt_io.LENGTH_BUCKET, limit)
            ids, mask = prompt_io.left_pad([encoded[i] for i in rows], padding_token_id(config), length,
                                           rows=self.gen_batch_size)
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
                np.array(rows + [rows[0]] * (self.gen_batch_size - len(rows)), np.uint32))
            generated = sharding.fetch(self.sampler(self.model, ids, mask, rng=keys))[:, length:]
            for r, i in enumerate(rows):
                outputs[i] = self._finish(generated[r], stops[i])
        for request, text in zip(requests, outputs):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return outputs

    def _finish(self, ids, stops: list[str]) -> str:
        """The official post-processing: decode with special tokens, cut at the stop strings, drop specials."""
        text = self.helper.decode(ids, skip_special_tokens=False)
        for stop in stops:
            if stop and stop in text:
                text = text.split(stop)[0]
        return self.helper.decode(self.helper.encode(text), skip_special_tokens=True)


def register() -> None:
    """Register the model as `llada_jax` (lazily, by import path: running this file as `__main__` and importing it
    register the same thing)."""
    target = "llada_jax.eval.lm_eval_adapter:LLaDAJaxLM"
    if hasattr(registry, "model_registry"):  # lm-eval >= 0.4.9: the lazy registry
        if "llada_jax" not in registry.model_registry:
            registry.model_registry.register("llada_jax", target=target)
    elif "llada_jax" not in registry.MODEL_REGISTRY:
        registry.register_model("llada_jax")(LLaDAJaxLM)


register()


def main() -> None:
    """lm-eval's command line with `llada_jax` registered (the console script `llada-jax-lm-eval`). Launched as
    several processes, each runs every request on the shared mesh; only process 0 prints and writes results (the
    others run without --output_path / --log_samples, their standard output discarded)."""
    from lm_eval.__main__ import cli_evaluate

    from llada_jax import distributed

    distributed.start(argparse.Namespace())  # before any device is touched: LLADA_JAX_* / SLURM / TPU set-up
    if jax.process_index() != 0:
        sys.argv = _without_outputs(sys.argv)
        sys.stdout = open(os.devnull, "w")
    cli_evaluate()


def _without_outputs(argv: list[str]) -> list[str]:
    """lm-eval's arguments without the ones that write files (--output_path / -o VALUE, --log_samples / -s)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--output_path", "-o"):
            skip = True
        elif arg in ("--log_samples", "-s") or arg.startswith("--output_path="):
            continue
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
