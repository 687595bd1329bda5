"""`llada-jax demo`: the whole life of a small LLaDA model on a CPU, from nothing but Python itself.

1. data: a pretraining corpus made of the prose of the standard library's `pydoc_data` topics, and a
   synthetic instruction task with exact answers (sort a list of digits), split into a training set and a
   held-out test set that shares no input with it;
2. a byte-level BPE tokenizer trained offline with the LLaDA special tokens and chat template;
3. `llada-jax pretrain` on the corpus, then `llada-jax sft` on the task (the same commands users run:
   Grain pipeline, sharded jitted step, Orbax checkpoints);
4. `llada-jax sample` on the held-out prompts with every method and remasking strategy, and the exact-match
   accuracy of each;
5. `ModelAnalyzer`: threshold decoding and KV caches against the plain sampler, attention maps;
6. `llada-jax convert to-hf` and a reload check (the JAX model from the HF directory, and the PyTorch model
   through transformers when torch is installed, against the trained model's logits);
7. `report.md`, `loss_curve.png` and `results.json` in the output directory.

With `--attention_type block_causal` the demo also trains the block-diffusion variant of the same model (blocks of
4 tokens, the BD3-LM objective) with the same commands and data, samples it with `block_diffusion` (an exact KV
cache, stopping after the block that holds EOS), and the report puts it beside the bidirectional model: exact
match, NFE and tokens/s (sampling only, compilation excluded).

With `--lora` the demo also fine-tunes the same pretrained model with LoRA (rank 16 adapters on every attention and
MLP projection of the frozen base, into `lora_sft/`), samples it, exports it both merged (a Hugging Face directory)
and as a PEFT adapter directory, and the report puts it beside the full fine-tune: exact match, trained
parameters, and the size of its checkpoint (the adapters) against the base's.

With `--moe` the demo also trains a Mixture-of-Experts block-diffusion model (the LLaDA 2.x MLP: after a dense first
layer, 8 experts of d_model hidden units, 2 chosen per token by a sigmoid router with group-limited choice, plus a
shared expert, so that a token uses as many MLP parameters as in the dense model; blocks of 4 as above) with the
same commands and data, samples it with `block_diffusion`, and the report puts it beside the dense model(s): exact
match, NFE, tokens/s, total and active parameters, and the router's balance from the training metrics.

Every step keeps its files in the output directory, so running the command again resumes where it stopped
(training from its checkpoints, sampling from its partly written outputs); only the analysis and the reload
check, seconds each, run again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time

from llada_jax.sampling.options import METHODS, REMASKING

DEFAULTS = dict(d_model=128, n_layers=4, n_heads=4, pretrain_steps=200, sft_steps=1500, batch_size=32,
                test_size=200, digits=5, seed=0)
SAMPLING = dict(gen_length=16, block_length=8, steps=16)
PRETRAIN_LENGTH, SFT_LENGTH = 128, 48
BLOCK_SIZE = 4  # the block-causal variant's blocks (divides both lengths and gen_length)
# The LoRA variant: rank 16 (alpha 32) on every projection, at the full fine-tune's learning rate. Measured on the
# default demo (200 held-out prompts, semi_ar_padding): 97.5% exact match at 1e-3, 73.5% at 2e-3, and 0% at 5e-3
# (gradient norms up to 20 early on, then a model that ignores the prompt).
LORA = dict(rank=16, alpha=32.0, learning_rate=1e-3)
# The MoE variant's MLPs (LLaDA 2.x's router: sigmoid scores, 4 groups of 2 experts of which the best 2 are kept,
# the chosen weights normalised then times 2.5; a learned expert bias for balancing). Its experts are d_model wide:
# 2 routed + 1 shared expert are 3 x d_model hidden units a token uses, the dense MLP's width (mlp_hidden_size
# 3 x d_model), so the active parameters are the dense model's plus the routers'. The first layer stays dense (when
# there are two layers or more), as in LLaDA 2.x.
MOE = dict(num_experts=8, experts_per_token=2, num_shared_experts=1, router_score="sigmoid", router_expert_bias=True,
           router_groups=4, router_topk_groups=2, router_norm_topk=True, router_scale=2.5)
# The MoE variant trains for a fraction of the dense models' steps: XLA:CPU computes `ragged_dot` densely over the
# experts (its cost grows with their number), and an SFT step took 0.4-0.8 s on 2 cores against 0.12 s for the dense
# bidirectional model's. With the defaults (10 pretraining and 250 SFT steps; 200 held-out prompts, block_diffusion)
# it reached 99.0% exact match, with the expert-bias update and without it (moe.bias_update_rate 0); 150 SFT steps
# gave 92.5% and 300 gave 100% (after 20 pretraining steps).
MOE_STEPS = dict(pretrain=20, sft=6)


def training_steps(a, moe: bool = False) -> dict:
    """{"pretrain": steps, "sft": steps} of the dense variants, or of the MoE one (a fraction of them)."""
    steps = {"pretrain": a.pretrain_steps, "sft": a.sft_steps}
    return {k: max(1, v // MOE_STEPS[k]) for k, v in steps.items()} if moe else steps


def register(sub) -> None:
    p = sub.add_parser("demo", help="train, fine-tune, sample, evaluate and export a small LLaDA on CPU (no downloads)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="demo_out", help="where everything goes (default: demo_out)")
    for name in ("d_model", "n_layers", "n_heads", "pretrain_steps", "sft_steps", "batch_size", "test_size",
                 "digits", "seed"):
        p.add_argument(f"--{name}", type=int, default=DEFAULTS[name], help=f"default {DEFAULTS[name]}")
    p.add_argument("--attention_type", choices=("bidirectional", "block_causal"), default="bidirectional",
                   help="block_causal: also train the block-diffusion variant and compare it in the report")
    p.add_argument("--lora", action="store_true",
                   help="also fine-tune with LoRA adapters on the frozen pretrained model and compare it in the report")
    p.add_argument("--moe", action="store_true",
                   help="also train a Mixture-of-Experts block-diffusion model (8 experts, 2 active + 1 shared) and "
                        "compare it in the report (exact match, NFE, tokens/s, total and active parameters)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def corpus_paragraphs() -> list[str]:
    """The prose of Python's own documentation topics (shipped with every CPython as pydoc_data)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            para = " ".join(para.split())
            if len(para) > 40:
                paragraphs.append(para)
    return paragraphs


# Digits joined by commas: the byte-level pre-tokenizer splits digits from punctuation, so every answer is
# 2 x digits - 1 tokens, one per character. (Joined by spaces, the BPE learns " 1", " 3", ... for some digits
# only, answers vary in length, and diffusion decoding then tends to commit a stray space mid-answer.)
def task_prompt(digits: list[int]) -> str:
    return "Sort: " + ",".join(map(str, digits))


def task_answer(digits: list[int]) -> str:
    return ",".join(map(str, sorted(digits)))


def task_split(n_train: int, n_test: int, digits: int, seed: int):
    """Distinct random digit lists: `n_test` held out, `n_train` for training, no list in both."""
    rng = random.Random(seed)
    seen, test = set(), []
    while len(test) < n_test:
        x = tuple(rng.randrange(10) for _ in range(digits))
        if x not in seen:
            seen.add(x)
            test.append(list(x))
    train = []
    while len(train) < n_train:
        x = tuple(rng.randrange(10) for _ in range(digits))
        if x not in seen:
            train.append(list(x))
    return train, test


def _write_jsonl(path: str, records) -> None:
    from llada_jax.checkpoints.atomic import atomic_file

    with atomic_file(path) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def prepare_data(out: str, a) -> dict:
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    paths = {name: os.path.join(data, name + ".jsonl") for name in ("corpus", "sft_train", "test")}
    if not all(os.path.exists(p) for p in paths.values()):
        _write_jsonl(paths["corpus"], ({"text": p} for p in corpus_paragraphs()))
        n_train = a.sft_steps * a.batch_size  # one epoch of distinct examples, more than the model needs
        train, test = task_split(min(n_train, 60000), a.test_size, a.digits, a.seed)
        _write_jsonl(paths["sft_train"], ({"messages": [{"role": "user", "content": task_prompt(x)},
                                                        {"role": "assistant", "content": task_answer(x)}]}
                                          for x in train))
        _write_jsonl(paths["test"], ({"id": i, "messages": [{"role": "user", "content": task_prompt(x)}],
                                      "answer": task_answer(x)} for i, x in enumerate(test)))
    return paths


def prepare_tokenizer(out: str, paths: dict) -> str:
    from llada_jax.data.bpe import build_bpe_tokenizer

    directory = os.path.join(out, "tokenizer")
    if not os.path.exists(os.path.join(directory, "tokenizer.json")):
        texts = [json.loads(line)["text"] for line in open(paths["corpus"], encoding="utf-8")]
        texts += [task_prompt(list(range(10))), task_answer(list(range(10)))] * 50
        build_bpe_tokenizer(texts, directory, vocab_size=512)  # the tiny preset's special ids
    return directory


# ----------------------------------------------------------------------------------------------------
# The steps, through the project's own commands
# ----------------------------------------------------------------------------------------------------


def _command(argv: list[str]) -> None:
    from llada_jax.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"llada-jax demo: `llada-jax {' '.join(argv[:1])}` failed with exit code {code}")


def model_config(a, attention_type: str = "bidirectional", moe: bool = False):
    """The demo model's architecture: the dense LLaDA, its block-causal variant, or the MoE block-causal one."""
    from llada_jax.config import LLaDAConfig

    blocks = dict(attention_type="block_causal", block_size=BLOCK_SIZE) if attention_type == "block_causal" else {}
    experts = dict(MOE, expert_hidden_size=a.d_model, first_dense_layers=min(1, a.n_layers - 1)) if moe else {}
    return LLaDAConfig.tiny(d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_heads,
                            mlp_hidden_size=3 * a.d_model, **blocks, **experts)


def _train_config(out: str, name: str, a, task: str, attention_type: str = "bidirectional", lora: bool = False,
                  moe: bool = False) -> str:
    from llada_jax.checkpoints.atomic import write_json
    from llada_jax.config import sft_defaults, train_config

    c = train_config(model_config(a, attention_type, moe), task=task)
    steps = training_steps(a, moe)
    if task == "sft":
        sft_defaults(c)
        c.learning_rate, c.max_length, c.max_steps = 1e-3, SFT_LENGTH, steps["sft"]
    else:
        c.learning_rate, c.max_length, c.max_steps = 2e-3, PRETRAIN_LENGTH, steps["pretrain"]
    c.batch_size, c.gradient_accumulation_steps = a.batch_size, 1
    c.warmup_steps = max(1, c.max_steps // 20)
    c.save_steps, c.logging_steps, c.seed = max(1, c.max_steps // 3), 5, a.seed
    c.checkpoint.keep = 1
    if lora:
        c.lora.enabled, c.lora.rank, c.lora.alpha, c.learning_rate = True, LORA["rank"], LORA["alpha"], LORA["learning_rate"]
    path = os.path.join(out, f"{name}_config.json")
    body = c.to_dict()
    body.pop("task")
    write_json(path, {"pretraining" if task == "pretrain" else "sft": body})
    return path


def train(out: str, paths: dict, tokenizer: str, a, times: dict, attention_type: str = "bidirectional",
          moe: bool = False) -> None:
    """Pretrain then fine-tune (into `pretrain/` and `sft/`, `block_pretrain/` and `block_sft/`, or
    `moe_pretrain/` and `moe_sft/`)."""
    prefix = "moe_" if moe else "block_" if attention_type == "block_causal" else ""
    pre, sft = prefix + "pretrain", prefix + "sft"
    steps = training_steps(a, moe)
    with _timed(times, f"{pre}_s", done=_trained(out, pre, steps["pretrain"])):
        _command(["pretrain", "--config", _train_config(out, pre, a, "pretrain", attention_type, moe=moe),
                  "--data_path", paths["corpus"], "--output_dir", os.path.join(out, pre),
                  "--config.data.tokenizer=" + tokenizer])
    with _timed(times, f"{sft}_s", done=_trained(out, sft, steps["sft"])):
        _command(["sft", "--config", _train_config(out, sft, a, "sft", attention_type, moe=moe), "--data_path",
                  paths["sft_train"], "--model_name_or_path", os.path.join(out, pre), "--output_dir",
                  os.path.join(out, sft)])


def train_lora(out: str, paths: dict, a, times: dict) -> None:
    """LoRA fine-tuning of `pretrain/` (frozen) into `lora_sft/`."""
    with _timed(times, "lora_sft_s", done=_trained(out, "lora_sft", a.sft_steps)):
        _command(["sft", "--config", _train_config(out, "lora_sft", a, "sft", lora=True), "--data_path",
                  paths["sft_train"], "--model_name_or_path", os.path.join(out, "pretrain"), "--output_dir",
                  os.path.join(out, "lora_sft")])


def _trained(out: str, name: str, steps: int) -> bool:
    from llada_jax.checkpoints.layout import latest_finished_step

    return (latest_finished_step(os.path.join(out, name)) or 0) >= steps


@contextlib.contextmanager
def _timed(times: dict, key: str, *, done: bool = False):
    """Time the block into `times[key]`, unless its work was already done (a resumed demo keeps the first
    run's figure)."""
    start = time.perf_counter()
    yield
    if not done or key not in times:
        times[key] = time.perf_counter() - start


def sample_all(out: str, paths: dict, times: dict, model: str = "sft", methods=METHODS, remaskings=REMASKING
               ) -> list[dict]:
    """Every method x remasking strategy on the held-out prompts through `llada-jax sample` (of the run `model`)."""
    answers = [json.loads(line)["answer"] for line in open(paths["test"], encoding="utf-8")]
    samples = "samples" if model == "sft" else f"samples_{model}"
    os.makedirs(os.path.join(out, samples), exist_ok=True)
    rows = []
    for method in methods:
        for remasking in remaskings:
            target = os.path.join(out, samples, f"{method}__{remasking}.jsonl")
            argv = ["sample", "--model", os.path.join(out, model), "--input", paths["test"], "--output", target,
                    "--sampling_method", method, "--remasking_strategy", remasking, "--batch_size", "100",
                    "--no_progress"] + [f"--{k}={v}" for k, v in SAMPLING.items()]
            done = os.path.exists(target) and sum(1 for _ in open(target, encoding="utf-8")) == len(answers)
            if os.path.exists(target):
                argv.append("--resume")
            key = f"sample_{'' if model == 'sft' else model + '_'}{method}_{remasking}_s"
            with _timed(times, key, done=done):
                _command(argv)
            seconds = times[key]
            lines = [json.loads(line) for line in open(target, encoding="utf-8")]
            correct = [line["text"].strip() == answer for line, answer in zip(lines, answers)]
            rows.append({"method": method, "remasking": remasking, "accuracy": sum(correct) / len(correct),
                         "mean_nfe": sum(line["nfe"] for line in lines) / len(lines), "seconds": seconds,
                         "examples": [(answers[i], lines[i]["text"]) for i in range(3)]})
    return rows


def block_diffusion_comparison(out: str, paths: dict, bidirectional, a) -> dict:
    """The block-diffusion model beside the bidirectional one on the held-out prompts: exact match, NFE and
    tokens/s (ModelAnalyzer's comparison: sampling time only), at the same gen_length and one token per step."""
    from llada_jax.checkpoints import load_model_and_tokenizer
    from llada_jax.eval.analysis import compare_sampling_methods

    model, tok, records = bidirectional
    block_model, _ = load_model_and_tokenizer(os.path.join(out, "block_sft"))
    dataset = [(tok.apply_chat_template(r["messages"]), r["answer"]) for r in records]
    plain, block = _dense_settings()
    rows = compare_sampling_methods(model, dataset, [plain], tokenizer=tok, batch_size=100)
    rows += compare_sampling_methods(block_model, dataset, [
        block, {**block, "name": "block_causal, block_diffusion, threshold 0.9", "threshold": 0.9}],
        tokenizer=tok, batch_size=100)
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {"rows": rows, "speedup": speedup, "target": {"min_accuracy": TARGET_ACCURACY,
                                                         "accuracy": rows[1]["accuracy"],
                                                         "met": rows[1]["accuracy"] >= TARGET_ACCURACY}}


def _dense_settings() -> tuple[dict, dict]:
    """(the bidirectional model's semi-autoregressive setting, the block-causal model's block_diffusion one) of the
    comparisons: the same gen_length, one token per step."""
    base = dict(gen_length=SAMPLING["gen_length"], steps=SAMPLING["steps"])
    return (dict(name="bidirectional, semi_ar_padding", method="semi_ar_padding", block_length=SAMPLING["block_length"],
                 **base),
            dict(name=f"block_causal (blocks of {BLOCK_SIZE}), block_diffusion", method="block_diffusion",
                 block_length=BLOCK_SIZE, **base))


ROUTER_METRICS = ("moe_max_over_mean_load", "moe_unused_experts")


def moe_comparison(out: str, trained, blocks: dict | None, a) -> dict:
    """The MoE block-diffusion model beside the dense model(s) on the held-out prompts: exact match, NFE, tokens/s
    (sampling only), total and active parameters; and the router's balance at the end of each training stage."""
    from llada_jax.checkpoints import load_model_and_tokenizer
    from llada_jax.eval.analysis import compare_sampling_methods
    from llada_jax.model import count_active_params, count_params
    from llada_jax.train.metrics import read_metrics

    model, tok, records = trained
    moe_model, _ = load_model_and_tokenizer(os.path.join(out, "moe_sft"))
    dataset = [(tok.apply_chat_template(r["messages"]), r["answer"]) for r in records]
    plain, block = _dense_settings()
    dense = blocks["rows"][:2] if blocks is not None else compare_sampling_methods(
        model, dataset, [plain], tokenizer=tok, batch_size=100)
    name = f"MoE block_causal (blocks of {BLOCK_SIZE}), block_diffusion"
    rows = compare_sampling_methods(moe_model, dataset, [
        {**block, "name": name}, {**block, "name": f"{name}, threshold 0.9", "threshold": 0.9}],
        tokenizer=tok, batch_size=100)
    dense_params = count_params(model.config)
    moe_params = (count_params(moe_model.config), count_active_params(moe_model.config))
    rows = [{**r, "total_parameters": dense_params, "active_parameters": dense_params} for r in dense] + [
        {**r, "total_parameters": moe_params[0], "active_parameters": moe_params[1]} for r in rows]
    router = {}
    for stage in ("moe_pretrain", "moe_sft"):
        logged = [m for m in read_metrics(os.path.join(out, stage)) if ROUTER_METRICS[0] in m]
        router[stage.removeprefix("moe_")] = {k: logged[-1][k] for k in ROUTER_METRICS} if logged else None
    c = moe_model.config
    accuracy = rows[len(dense)]["accuracy"]
    return {"rows": rows, "router": router, "steps": training_steps(a, moe=True),
            "model": {k: getattr(c, k) for k in (*MOE, "expert_hidden_size", "first_dense_layers", "n_layers",
                                                 "d_model", "block_size")},
            "target": {"min_accuracy": TARGET_ACCURACY, "accuracy": accuracy, "met": accuracy >= TARGET_ACCURACY}}


def lora_comparison(out: str, paths: dict, times: dict, trained) -> dict:
    """The LoRA fine-tune beside the full one: exact match (semi_ar_padding, low confidence), trained parameters, the
    checkpoint's size against the base's, and its exports (merged HF directory and PEFT adapter), with the merged
    export's PyTorch logits against the adapters'."""
    import jax
    import numpy as np
    from flax import nnx

    from llada_jax.checkpoints import load_model_and_tokenizer
    from llada_jax.checkpoints.layout import latest_finished_step, step_dir
    from llada_jax.model import count_params

    row = sample_all(out, paths, times, "lora_sft", ("semi_ar_padding",), ("low_confidence",))[0]
    run, base = os.path.join(out, "lora_sft"), os.path.join(out, "pretrain")

    def params_bytes(run_dir):
        params = os.path.join(step_dir(run_dir, latest_finished_step(run_dir)), "params")
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(params) for f in files)

    model, _ = load_model_and_tokenizer(run)
    adapter_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    hf, peft = os.path.join(out, "lora_hf"), os.path.join(out, "lora_peft")
    if not os.path.exists(os.path.join(hf, "config.json")):
        _command(["convert", "to-hf", "--input", run, "--output", hf])
    if not os.path.exists(os.path.join(peft, "adapter_config.json")):
        _command(["convert", "to-hf", "--adapter_only", "--input", run, "--output", peft])
    tok, records = trained[1], trained[2]
    ids = [np.array([tok.apply_chat_template(r["messages"])]) for r in records[:4]]
    result = {"accuracy": row["accuracy"], "examples": row["examples"], "trained_parameters": adapter_params,
              "base_parameters": count_params(model.config), "checkpoint_bytes": params_bytes(run),
              "base_checkpoint_bytes": params_bytes(base), "hf_dir": hf, "peft_dir": peft}
    result["checkpoint_ratio"] = result["checkpoint_bytes"] / result["base_checkpoint_bytes"]
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        return result
    torch_model = AutoModel.from_pretrained(hf, trust_remote_code=True).eval()
    with torch.no_grad():
        result["merged_torch_max_abs_diff"] = max(float(np.max(np.abs(
            torch_model(torch.from_numpy(x)).logits.float().numpy() - np.asarray(model(x))))) for x in ids)
    return result


def load_trained(out: str, paths: dict) -> tuple:
    """(the fine-tuned model, its tokenizer, the held-out records): what the analysis and the reload check use."""
    from llada_jax.checkpoints import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(os.path.join(out, "sft"))
    records = [json.loads(line) for line in open(paths["test"], encoding="utf-8")]
    return model, tok, records


def analyse(out: str, model, tok, records: list[dict]) -> dict:
    """ModelAnalyzer on the fine-tuned model: faster decoders (threshold commits, KV caches) against
    the one-token-per-step sampler on the held-out set, and the attention maps of one prompt."""
    import numpy as np

    from llada_jax.eval.analysis import ModelAnalyzer, default_settings

    dataset = [(tok.apply_chat_template(r["messages"]), r["answer"]) for r in records]
    analyzer = ModelAnalyzer(os.path.join(out, "analysis"))
    settings = default_settings(gen_length=SAMPLING["gen_length"], block_length=SAMPLING["block_length"])
    rows = analyzer.compare_sampling_methods(model, dataset, settings, tokenizer=tok, batch_size=100)
    analyzer.analyze_attention_patterns(model, np.array([dataset[0][0]]), tokenizer=tok)
    return {"comparison": rows, "attention_plots": os.path.join(out, "analysis", "attention")}


def export_and_reload(out: str, trained, tok, records: list[dict]) -> dict:
    """Export to HF, reload it both in JAX and (if torch is installed) in PyTorch, and compare logits."""
    import numpy as np

    from llada_jax import LLaDAForMaskedLM

    hf = os.path.join(out, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        _command(["convert", "to-hf", "--input", os.path.join(out, "sft"), "--output", hf])
    # one prompt at a time: no padding
    ids = [np.array([tok.apply_chat_template(r["messages"])]) for r in records[:4]]
    reference = [np.asarray(trained(x)) for x in ids]
    reloaded = LLaDAForMaskedLM.from_pretrained(hf)
    diff = max(float(np.max(np.abs(np.asarray(reloaded(x)) - r))) for x, r in zip(ids, reference))
    result = {"hf_dir": hf, "jax_max_abs_diff": diff}
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        result["torch"] = "not installed: PyTorch reload skipped"
        return result
    torch_model = AutoModel.from_pretrained(hf, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = [torch_model(torch.from_numpy(x)).logits.float().numpy() for x in ids]
    result["torch_max_abs_diff"] = max(float(np.max(np.abs(a - r))) for a, r in zip(logits, reference))
    return result


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def loss_curve(out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from llada_jax.checkpoints.atomic import atomic_file
    from llada_jax.train.metrics import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, ("pretrain", "sft")):
        m = read_metrics(os.path.join(out, name))
        steps, loss = np.array([r["step"] for r in m]), np.array([r["loss"] for r in m])
        ax.plot(steps, loss, alpha=0.35, label="logged")
        window = min(5, len(loss))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"mean of {window}")
        ax.legend()
        ax.set_title(f"{name} loss ({'masked-diffusion bound, pydoc prose' if name == 'pretrain' else 'sorting task'})")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "loss_curve.png")
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


TARGET_ACCURACY = 0.9  # semi-autoregressive low-confidence exact match of the default demo


def target_check(rows: list[dict]) -> dict:
    """The demo's success criterion: semi-AR (padding) low-confidence decoding at >= 90% exact match."""
    accuracy = next(r["accuracy"] for r in rows
                    if (r["method"], r["remasking"]) == ("semi_ar_padding", "low_confidence"))
    return {"min_accuracy": TARGET_ACCURACY, "accuracy": accuracy, "met": accuracy >= TARGET_ACCURACY}


def write_report(out: str, a, rows: list[dict], times: dict, export: dict, analysis: dict,
                 blocks: dict | None = None, lora: dict | None = None, moe: dict | None = None) -> None:
    from llada_jax.checkpoints.atomic import atomic_file, write_json
    from llada_jax.eval.analysis import format_table
    from llada_jax.train.metrics import read_metrics

    pre, sft = read_metrics(os.path.join(out, "pretrain")), read_metrics(os.path.join(out, "sft"))
    results = {"accuracy": {f"{r['method']}/{r['remasking']}": r["accuracy"] for r in rows},
               "nfe": {f"{r['method']}/{r['remasking']}": r["mean_nfe"] for r in rows},
               "fast_decoding": [{k: r[k] for k in ("name", "accuracy", "nfe", "tokens_per_s")}
                                 for r in analysis["comparison"]],
               "target": target_check(rows), "timings_s": times, "export": export,
               "final_loss": {"pretrain": pre[-1]["loss"], "sft": sft[-1]["loss"]},
               "settings": {**{k: getattr(a, k) for k in DEFAULTS}, **SAMPLING}}
    if blocks is not None:
        results["block_diffusion"] = {
            "rows": [{k: r[k] for k in ("name", "accuracy", "nfe", "tokens_per_s")} for r in blocks["rows"]],
            "speedup": blocks["speedup"], "target": blocks["target"],
            "final_loss": {name: read_metrics(os.path.join(out, name))[-1]["loss"]
                           for name in ("block_pretrain", "block_sft")}}
    if lora is not None:
        lora = {**lora, "final_loss": read_metrics(os.path.join(out, "lora_sft"))[-1]["loss"],
                "target": {"min_accuracy": TARGET_ACCURACY, "accuracy": lora["accuracy"],
                           "met": lora["accuracy"] >= TARGET_ACCURACY}}
        results["lora"] = lora
    if moe is not None:
        moe = {**moe, "rows": [{k: r[k] for k in ("name", "accuracy", "nfe", "tokens_per_s", "total_parameters",
                                                 "active_parameters")} for r in moe["rows"]],
               "final_loss": {name: read_metrics(os.path.join(out, name))[-1]["loss"]
                              for name in ("moe_pretrain", "moe_sft")}}
        results["moe"] = moe
    write_json(os.path.join(out, "results.json"), results)
    lines = [
        "# llada-jax demo",
        "",
        f"A LLaDA model (d_model {a.d_model}, {a.n_layers} layers, {a.n_heads} heads, vocabulary 512) pretrained for "
        f"{a.pretrain_steps} steps on the prose of Python's pydoc topics, then fine-tuned for {a.sft_steps} steps "
        f"to sort {a.digits} digits, and evaluated on {a.test_size} held-out prompts "
        f"(gen_length {SAMPLING['gen_length']}, block_length {SAMPLING['block_length']}, steps {SAMPLING['steps']}, "
        "temperature 0).",
        "",
        "| method | remasking | exact match | mean NFE | seconds (load, compile, 200 prompts) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['method']} | {r['remasking']} | {r['accuracy']:.1%} | {r['mean_nfe']:.1f} | {r['seconds']:.1f} |"
              for r in rows]
    target = target_check(rows)
    lines += ["", f"Target: semi-autoregressive low-confidence sampling at least {target['min_accuracy']:.0%} exact match: "
              + ("**met**" if target["met"] else "**not met**") + f" ({target['accuracy']:.1%})."]
    lines += ["", "Final training loss: pretraining {:.3f}, SFT {:.4f}. ![loss curves](loss_curve.png)".format(
        pre[-1]["loss"], sft[-1]["loss"]), "", "## Faster decoding (ModelAnalyzer.compare_sampling_methods)", "",
        "Semi-autoregressive low-confidence decoding on the same prompts: one token per step, two per step, and "
        "confidence-threshold commits (Fast-dLLM) with and without KV caches. tokens/s excludes compilation.", "",
        format_table(analysis["comparison"]), "",
        f"Attention maps of the first prompt, one heatmap per layer: `{os.path.relpath(analysis['attention_plots'], out)}/`.",
        ]
    if blocks is not None:
        lines += ["", f"## Block diffusion (--attention_type block_causal, blocks of {BLOCK_SIZE})", "",
                  "The same model trained as a block-causal model (the BD3-LM objective, same data and steps), sampled "
                  "block by block with an exact KV cache, stopping after the block that holds EOS; beside the "
                  "bidirectional model's semi-autoregressive sampler at the same gen_length, one token per step. "
                  "tokens/s excludes compilation.", "", format_table(blocks["rows"]), "",
                  f"block_diffusion runs {blocks['speedup']:.1f}x the tokens/s of semi_ar_padding on the "
                  f"bidirectional model. Target: block_diffusion at least {TARGET_ACCURACY:.0%} exact match: "
                  + ("**met**" if blocks["target"]["met"] else "**not met**")
                  + f" ({blocks['target']['accuracy']:.1%})."]
    if lora is not None:
        full = target_check(rows)["accuracy"]
        lines += ["", f"## LoRA fine-tuning (--lora: rank {LORA['rank']}, alpha {LORA['alpha']:g}, every projection)", "",
                  f"The same pretrained model fine-tuned on the same data for the same steps with its weights frozen and "
                  f"LoRA adapters trained (learning rate {LORA['learning_rate']:g}), sampled with semi_ar_padding / "
                  "low_confidence.", "",
                  "| fine-tune | trained parameters | checkpoint (parameters) | exact match | final loss |",
                  "|---|---:|---:|---:|---:|",
                  f"| full | {lora['base_parameters']:,} | {lora['base_checkpoint_bytes'] / 2**20:.2f} MiB | {full:.1%} | "
                  f"{sft[-1]['loss']:.4f} |",
                  f"| LoRA | {lora['trained_parameters']:,} | {lora['checkpoint_bytes'] / 2**20:.2f} MiB "
                  f"({lora['checkpoint_ratio']:.1%} of the base's) | {lora['accuracy']:.1%} | {lora['final_loss']:.4f} |",
                  "", f"Target: LoRA at least {TARGET_ACCURACY:.0%} exact match: "
                  + ("**met**" if lora["target"]["met"] else "**not met**") + f" ({lora['accuracy']:.1%}).",
                  f"Exports: merged Hugging Face directory `{lora['hf_dir']}`, PEFT adapter `{lora['peft_dir']}` "
                  "(`peft.PeftModel.from_pretrained(base, dir)` on the exported base)."]
        if "merged_torch_max_abs_diff" in lora:
            lines.append(f"The merged export in PyTorch against the JAX model with adapters: max |logit difference| "
                         f"{lora['merged_torch_max_abs_diff']:.2e}.")
    if moe is not None:
        m, steps = moe["model"], moe["steps"]
        dense = "the first layer dense, " if m["first_dense_layers"] else ""
        lines += ["", f"## Mixture of Experts (--moe: {m['num_experts']} experts, {m['experts_per_token']} per token "
                  f"+ {m['num_shared_experts']} shared, blocks of {m['block_size']})", "",
                  f"A block-causal model of the same shape whose MLPs are Mixture-of-Experts layers ({dense}the LLaDA 2.x "
                  f"router: sigmoid scores, {m['router_groups']} groups of which the best {m['router_topk_groups']} "
                  f"are kept; experts of {m['expert_hidden_size']} hidden units, so a token uses the dense MLP's "
                  f"width), pretrained for {steps['pretrain']} and fine-tuned for {steps['sft']} steps on the same "
                  "data with the same commands, sampled with block_diffusion, beside the dense model(s) at the same "
                  "gen_length, one token per step. Active parameters: those a token uses (model-info's count). "
                  "tokens/s excludes compilation.", "",
                  "| model, sampler | parameters | active parameters | exact match | NFE | tokens/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['total_parameters']:,} | {r['active_parameters']:,} | {r['accuracy']:.1%} | "
                  f"{r['nfe']:.1f} | {r['tokens_per_s']:.1f} |" for r in moe["rows"]]
        balance = "; ".join(
            f"after {stage} the busiest expert got {v['moe_max_over_mean_load']:.2f}x the mean load and "
            f"{v['moe_unused_experts']:.0%} of the experts no token" for stage, v in moe["router"].items() if v)
        lines += ["", f"Router balance (the training metrics' last logged step, mean over the MoE layers; a busiest "
                  f"expert at 1x the mean is perfect balance, {m['num_experts'] / m['experts_per_token']:g}x every "
                  f"token sent to the same experts): {balance}. "
                  f"Final loss: pretraining {moe['final_loss']['moe_pretrain']:.3f}, SFT "
                  f"{moe['final_loss']['moe_sft']:.4f}.",
                  f"Target: the MoE model's block_diffusion at least {TARGET_ACCURACY:.0%} exact match: "
                  + ("**met**" if moe["target"]["met"] else "**not met**") + f" ({moe['target']['accuracy']:.1%})."]
    lines += ["", "## Timings", ""]
    lines += [f"- {k.removesuffix('_s')}: {v:.1f} s" for k, v in times.items()]
    lines += ["", "## Sample generations (expected -> generated)", ""]
    for r in rows:
        shown = "; ".join(f"`{want}` -> `{got.strip()}`" for want, got in r["examples"])
        lines.append(f"- {r['method']} / {r['remasking']}: {shown}")
    lines += ["", "## Export", "", f"Hugging Face directory: `{export['hf_dir']}`. Reloaded in JAX: max |logit "
              f"difference| {export['jax_max_abs_diff']:.2e}."]
    if "torch_max_abs_diff" in export:
        lines.append(f"Loaded by transformers (`AutoModel`, trust_remote_code) in PyTorch: max |logit difference| "
                     f"{export['torch_max_abs_diff']:.2e}.")
    else:
        lines.append(f"PyTorch: {export['torch']}.")
    with atomic_file(os.path.join(out, "report.md")) as f:
        f.write("\n".join(lines) + "\n")


def run(a) -> int:
    from llada_jax.checkpoints.atomic import write_json

    out = os.path.abspath(a.output_dir)
    os.makedirs(out, exist_ok=True)
    timings_path = os.path.join(out, "timings.json")
    times = json.load(open(timings_path, encoding="utf-8")) if os.path.exists(timings_path) else {}
    with _timed(times, "data_and_tokenizer_s", done=os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json"))):
        paths = prepare_data(out, a)
        tokenizer = prepare_tokenizer(out, paths)
    write_json(timings_path, times)
    train(out, paths, tokenizer, a, times)
    write_json(timings_path, times)
    if a.attention_type == "block_causal":
        train(out, paths, tokenizer, a, times, "block_causal")
        write_json(timings_path, times)
    if a.lora:
        train_lora(out, paths, a, times)
        write_json(timings_path, times)
    if a.moe:
        train(out, paths, tokenizer, a, times, "block_causal", moe=True)
        write_json(timings_path, times)
    rows = sample_all(out, paths, times)
    write_json(timings_path, times)
    with _timed(times, "analysis_s"):
        trained = load_trained(out, paths)
        analysis = analyse(out, *trained)
    blocks = None
    if a.attention_type == "block_causal":
        with _timed(times, "block_diffusion_comparison_s"):
            blocks = block_diffusion_comparison(out, paths, trained, a)
    lora = None
    if a.lora:
        with _timed(times, "lora_comparison_s"):
            lora = lora_comparison(out, paths, times, trained)
    moe = None
    if a.moe:
        with _timed(times, "moe_comparison_s"):
            moe = moe_comparison(out, trained, blocks, a)
    with _timed(times, "export_and_reload_s"):
        export = export_and_reload(out, *trained)
    write_json(timings_path, times)
    loss_curve(out)
    write_report(out, a, rows, {k: v for k, v in times.items() if not k.startswith("sample_")}, export, analysis,
                 blocks, lora, moe)
    print(open(os.path.join(out, "report.md"), encoding="utf-8").read())
    return 0
