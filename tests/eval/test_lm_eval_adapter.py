"""The lm-evaluation-harness adapter end to end, offline: `python -m llada_jax.eval.lm_eval_adapter --model
llada_jax` on two local tasks (a multiple-choice loglikelihood task and a generate_until task, custom YAML over
local JSONL files), checked against the package's own estimator and sampler."""

import glob
import json
import runpy
import sys

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install -e '.[eval]')")

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, generate
from llada_jax.checkpoints.orbax_model import save_model
from llada_jax.data.bpe import build_bpe_tokenizer
from llada_jax.eval import log_likelihood
from llada_jax.eval.likelihood import encode_pair
from llada_jax.sampling.prompts import left_pad, padded_length
from llada_jax.tokenizer import config_overrides

TEXTS = ["two plus two is four.", "three plus three is six.", "the sky is blue.", "grass is green.",
         "Question: what colour is the sky? Answer: blue"] * 4
MC = [{"question": "two plus two is", "choices": ["four", "six"], "label": 0},
      {"question": "the sky is", "choices": ["green", "blue"], "label": 1},
      {"question": "grass is", "choices": ["green", "blue"], "label": 0}]
GEN = [{"question": "Question: what colour is the sky? Answer:", "answer": " blue"},
       {"question": "three plus", "answer": " three"}]
MC_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_YAML = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
metric_list:
  - metric: exact_match
"""


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_lm_eval_runs_llada_jax_on_local_tasks(tmp_path, monkeypatch):
    from llada_jax.tokenizer import TokenizerHelper

    helper = build_bpe_tokenizer(TEXTS, str(tmp_path / "tok"), vocab_size=300)
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(**config_overrides(helper), max_sequence_length=64), rngs=nnx.Rngs(1))
    run = save_model(model, str(tmp_path / "run"), tokenizer_dir=str(tmp_path / "tok"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = write(tmp_path / "mc.jsonl", "".join(json.dumps(r) + "\n" for r in MC))
    gen = write(tmp_path / "gen.jsonl", "".join(json.dumps(r) + "\n" for r in GEN))
    write(tasks / "toy_mc.yaml", MC_YAML.format(path=mc))
    write(tasks / "toy_gen.yaml", GEN_YAML.format(path=gen))
    out = tmp_path / "out"
    model_args = (f"pretrained={run},mc_num=8,gen_length=8,block_length=4,steps=4,threshold=0.9,cache=dual,"
                  "is_check_greedy=True")
    # What a user runs, in this process (a new one would pay for importing JAX and lm-eval again): the adapter
    # module as __main__, which registers `llada_jax` and hands the arguments to lm-eval's command line.
    from lm_eval.tasks.manager import TaskManager

    index_tasks = TaskManager.__init__

    def local_tasks_only(self, *args, **kwargs):  # lm-eval indexes its thousands of built-in tasks (seconds)
        index_tasks(self, *args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(TaskManager, "__init__", local_tasks_only)
    for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                        ("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [
        "llada_jax.eval.lm_eval_adapter", "--model", "llada_jax", "--model_args", model_args,
        "--tasks", "toy_mc,toy_gen", "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(out),
        "--log_samples"])
    runpy.run_module("llada_jax.eval.lm_eval_adapter", run_name="__main__")
    results = json.load(open(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]))["results"]
    assert 0 <= results["toy_mc"]["acc,none"] <= 1 and 0 <= results["toy_gen"]["exact_match,none"] <= 1

    def samples(task):
        path = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)[0]
        return sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])

    tok = TokenizerHelper(str(tmp_path / "tok"))
    # loglikelihood: each choice's score is a Monte Carlo estimate (8 samples in 2 stratified batches of 4),
    # compared with another estimate of the same kind (other draws; the same compiled program)
    mc_samples = samples("toy_mc")
    pairs = [encode_pair(tok, doc["question"], " " + choice) for doc in MC for choice in doc["choices"]]
    est = log_likelihood(model, [p for p, _ in pairs], [a for _, a in pairs], mc_num=8, batch_size=4, rng=9,
                         return_stderr=True)
    scores = [float(r[0][0]) for s in mc_samples for r in s["resps"]]
    tolerance = 5 * np.sqrt(2) * est.stderr + 1e-4  # 5 sigma of the difference (one-token answers: exact)
    assert (np.abs(np.array(scores) - est.log_likelihood) < tolerance).all(), (scores, est)
    for s, doc in zip(mc_samples, MC):
        assert s["acc"] == float(np.argmax([float(r[0][0]) for r in s["resps"]]) == doc["label"])
    # generate_until: the sampler's answer (temperature 0) cut at the stop string
    encoded = [tok.encode(doc["question"], add_special_tokens=True) for doc in GEN]
    width = padded_length(max(map(len, encoded)), 16, 64 - 8)
    ids, mask = left_pad(encoded, tok.pad_token_id, width, rows=8)  # the adapter's batch shape
    out_ids = np.asarray(generate(model, ids, mask, gen_length=8, block_length=4, steps=4, threshold=0.9,
                                  cache="dual", eot_id=tok.eot_id))[:, width:]
    for s, row in zip(samples("toy_gen"), out_ids):
        text = tok.decode(row).split(".")[0]
        assert s["resps"][0][0] == tok.decode(tok.encode(text), skip_special_tokens=True)


def test_lm_eval_on_two_processes_equals_one(tmp_path):
    """`llada-jax-lm-eval` launched as 2 processes x 2 devices on a data=2, tensor=2 mesh: the same scores as one
    process on one device; only process 0 writes results."""
    from tests.runs import cli, launch

    helper = build_bpe_tokenizer(TEXTS, str(tmp_path / "tok"), vocab_size=300)
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(**config_overrides(helper), max_sequence_length=64), rngs=nnx.Rngs(1))
    run = save_model(model, str(tmp_path / "run"), tokenizer_dir=str(tmp_path / "tok"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write(tasks / "toy_mc.yaml", MC_YAML.format(path=write(tmp_path / "mc.jsonl", "".join(json.dumps(r) + "\n"
                                                                                         for r in MC))))
    write(tasks / "toy_gen.yaml", GEN_YAML.format(path=write(tmp_path / "gen.jsonl", "".join(json.dumps(r) + "\n"
                                                                                            for r in GEN))))
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    scores = {}
    for name, mesh in (("one", ""), ("two", ",mesh_data=2,mesh_tensor=2")):
        out = tmp_path / name
        args = ["--model", "llada_jax", "--model_args", f"pretrained={run},mc_num=8,gen_length=8,block_length=4,"
                f"steps=4{mesh}", "--tasks", "toy_mc,toy_gen", "--include_path", str(tasks), "--batch_size", "4",
                "--output_path", str(out), "--log_samples"]
        if name == "one":
            cli(*args, devices=1, module="llada_jax.eval.lm_eval_adapter", env=env)
        else:
            proc = launch(2, 2, *args, module="llada_jax.eval.lm_eval_adapter", env=env)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
        assert len(results) == 1  # written once
        samples = {}
        for path in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
            for line in open(path):
                s = json.loads(line)
                samples[(path.rsplit("samples_", 1)[1].split("_2")[0], s["doc_id"])] = s["resps"]
        scores[name] = samples
    assert scores["one"].keys() == scores["two"].keys() and scores["one"]
    for key, resps in scores["one"].items():
        other = scores["two"][key]
        if "toy_mc" in key[0]:  # loglikelihoods: float32 sums in another order
            np.testing.assert_allclose([float(r[0][0]) for r in other], [float(r[0][0]) for r in resps], rtol=1e-5)
        else:
            assert other == resps


def test_a_model_without_pad_or_eos_is_refused_when_the_adapter_is_built(tokenizer_dir):
    """Issue 28: generate_until left-pads prompts with pad_token_id, else eos_token_id; a model with neither is a
    ValueError naming the field when the adapter is made, not a TypeError in the middle of an evaluation."""
    from llada_jax.eval.lm_eval_adapter import LLaDAJaxLM
    from llada_jax.tokenizer import load_tokenizer

    helper = load_tokenizer(tokenizer_dir)
    config = LLaDAConfig.tiny(**config_overrides(helper), max_sequence_length=64).replace(eos_token_id=None,
                                                                                          pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        LLaDAJaxLM(model=LLaDAForMaskedLM(config, rngs=nnx.Rngs(0)), tokenizer=helper, mc_num=2, batch_size=2)
