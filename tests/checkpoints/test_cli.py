"""Hugging Face directories at command level: `convert to-hf --dtype`, and `sample`, `inference` and
`eval-likelihood --model` given an HF directory (with its tokenizer) or a `convert from-hf` output, each
checked against the Python API on the same model."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, generate
from llada_jax.checkpoints.hf_keys import hf_state_dict
from llada_jax.checkpoints.layout import tokenizer_path
from llada_jax.checkpoints.orbax_model import save_model
from llada_jax.checkpoints.safetensors_io import TensorReader
from llada_jax.cli import main
from llada_jax.data.bpe import build_bpe_tokenizer
from llada_jax.eval import log_likelihood
from llada_jax.eval.likelihood import encode_pair
from llada_jax.tokenizer import TokenizerHelper, config_overrides
from tests.checkpoints.hf_helpers import run_cli

FLAGS = ["--gen_length", "8", "--block_length", "4", "--steps", "4", "--no_progress"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello there, how are you today? I am fine, thank you.",
] * 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The model (fp32) and, saved from it: an Orbax run, an HF directory (save_pretrained, with the
    tokenizer) and the `convert from-hf` output of that HF directory."""
    base = tmp_path_factory.mktemp("hfcli")
    tok_dir = str(base / "tok")
    helper = build_bpe_tokenizer(TEXTS, tok_dir, vocab_size=320)
    config = LLaDAConfig.tiny(**config_overrides(helper), n_kv_heads=2, max_sequence_length=64)
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(3))
    run = save_model(model, str(base / "run"), tokenizer_dir=tok_dir)
    hf_dir = str(base / "hf")
    model.save_pretrained(hf_dir, tokenizer_dir=tok_dir)
    converted = str(base / "from_hf")
    assert main(["convert", "from-hf", "--input", hf_dir, "--output", converted]) == 0
    return dict(model=model, run=run, hf=hf_dir, from_hf=converted, base=base)


def truncated_bf16(x):
    """fp32 -> bf16 by dropping the low 16 bits (what a cast that does not round would give)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(ml_dtypes.bfloat16)


# --- convert to-hf --dtype ----------------------------------------------------------------------------------------


def test_to_hf_dtype_casts_the_weights(dirs, capsys):
    model, run, base = dirs["model"], dirs["run"], dirs["base"]
    expected = hf_state_dict(model)  # float32, the official keys and layout
    assert {v.dtype for v in expected.values()} == {np.dtype(np.float32)}

    bf16 = str(base / "to_hf_bf16")
    assert main(["convert", "to-hf", "--input", run, "--output", bf16, "--dtype", "bfloat16"]) == 0
    assert f"wrote {bf16}" in capsys.readouterr().out
    assert json.load(open(os.path.join(bf16, "config.json")))["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in TensorReader(bf16).tensors.values()} == {"BF16"}  # the safetensors header
    stored = load_file(os.path.join(bf16, "model.safetensors"))  # read by the safetensors package
    assert set(stored) == set(expected)
    rounded_differently = 0
    for k, v in expected.items():
        assert stored[k].dtype == np.dtype(ml_dtypes.bfloat16) and stored[k].shape == v.shape, k
        # round to nearest even, as jnp / ml_dtypes / torch cast fp32 -> bf16
        assert stored[k].tobytes() == v.astype(ml_dtypes.bfloat16).tobytes(), k
        rounded_differently += int((v.astype(ml_dtypes.bfloat16) != truncated_bf16(v)).sum())
    assert rounded_differently > 0  # the check above tells rounding from truncation
    assert tokenizer_path(bf16) == bf16  # the tokenizer travels with the export

    # float32 from a bf16 checkpoint: exactly the bf16 values, widened
    bf16_ckpt = str(base / "bf16_ckpt")
    assert main(["convert", "from-hf", "--input", bf16, "--output", bf16_ckpt]) == 0
    fp32 = str(base / "to_hf_fp32")
    assert main(["convert", "to-hf", "--input", bf16_ckpt, "--output", fp32, "--dtype", "float32",
                 "--max_shard_size", "50KB"]) == 0
    assert json.load(open(os.path.join(fp32, "config.json")))["torch_dtype"] == "float32"
    reader = TensorReader(fp32)
    assert len({entry for entry in os.listdir(fp32) if entry.endswith(".safetensors")}) > 1  # sharded
    assert {t.dtype for t in reader.tensors.values()} == {"F32"}
    for k, v in stored.items():
        got = reader.read(k)
        assert got.dtype == np.float32 and got.tobytes() == v.astype(np.float32).tobytes(), k

    # float32 from the float32 checkpoint: the parameters bit for bit; no --dtype keeps the checkpoint's
    same = str(base / "to_hf_same")
    assert main(["convert", "to-hf", "--input", run, "--output", same, "--dtype", "float32"]) == 0
    default = str(base / "to_hf_default")
    assert main(["convert", "to-hf", "--input", bf16_ckpt, "--output", default]) == 0
    for k, v in expected.items():
        assert TensorReader(same).read(k).tobytes() == v.tobytes(), k
        assert TensorReader(default).read(k).tobytes() == stored[k].tobytes(), k
    assert json.load(open(os.path.join(default, "config.json")))["torch_dtype"] == "bfloat16"


# --- sample / inference / eval-likelihood --model HF_DIR -------------------------------------------------------------


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["hf", "from_hf"])
def test_sample_from_an_hf_directory_equals_the_api(dirs, kind):
    model, path, base = dirs["model"], dirs[kind], dirs["base"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(path))
    assert tokenizer_path(path) == (path if kind == "hf" else os.path.join(path, "tokenizer"))
    records = [{"id": "ids", "input_ids": [5, 6, 7, 8]}, {"id": "text", "prompt": "The quick brown fox"}]
    src = write_jsonl(base / f"sample_in_{kind}.jsonl", records)
    out = str(base / f"sample_out_{kind}.jsonl")
    assert main(["sample", "--model", path, "--input", src, "--output", out, "--batch_size", "1", *FLAGS]) == 0
    lines = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [line["id"] for line in lines] == ["ids", "text"]
    prompts = [[5, 6, 7, 8], tokenizer.encode("The quick brown fox", add_special_tokens=True)]
    for line, ids in zip(lines, prompts):
        want = np.asarray(generate(model, np.array([ids]), gen_length=8, block_length=4, steps=4))[0, len(ids):]
        assert line["output_ids"] == want.tolist()
        assert line["text"] == tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["hf", "from_hf"])
def test_inference_from_an_hf_directory_equals_the_api(dirs, kind, capsys):
    model, path = dirs["model"], dirs[kind]
    helper = TokenizerHelper(tokenizer_path(path))
    assert main(["inference", "--model", path, "--prompt", "Hello there", "--sampling_method", "fixed_length",
                 *FLAGS[:-1]]) == 0
    ids = helper.apply_chat_template([{"role": "user", "content": "Hello there"}])
    out = np.asarray(generate(model, np.array([ids]), method="fixed_length", gen_length=8, steps=4))[0, len(ids):]
    assert capsys.readouterr().out == helper.decode(out.tolist(), skip_special_tokens=True) + "\n"


def test_the_tokenizer_of_an_hf_directory_loads_without_a_remote_code_prompt(dirs, monkeypatch):
    import builtins

    asked = []

    def no_input(prompt=""):
        asked.append(prompt)
        return "n"

    monkeypatch.setattr(builtins, "input", no_input)
    helper = TokenizerHelper(dirs["hf"])
    assert helper.encode("Hello") and not asked, asked[:1]


@pytest.mark.parametrize("kind", ["hf", "from_hf"])
def test_eval_likelihood_from_an_hf_directory_equals_the_api(dirs, kind):
    model, path, base = dirs["model"], dirs[kind], dirs["base"]
    helper = TokenizerHelper(tokenizer_path(path))
    pairs = [{"id": "ids", "prompt_ids": [3, 17, 42], "answer_ids": [250, 8, 9]},
             {"id": "text", "prompt": "What is the capital of France?", "answer": " Paris."}]
    src = write_jsonl(base / f"ll_in_{kind}.jsonl", pairs)
    out = base / f"ll_out_{kind}.jsonl"
    assert main(["eval-likelihood", "--model", path, "--input", src, "--output", str(out), "--mc_num", "8",
                 "--batch_size", "4", "--seed", "5"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    prompt, answer = encode_pair(helper, pairs[1]["prompt"], pairs[1]["answer"])
    assert answer, "the text pair must have answer tokens"
    want = log_likelihood(model, [pairs[0]["prompt_ids"], prompt], [pairs[0]["answer_ids"], answer], mc_num=8,
                          batch_size=4, rng=5, return_stderr=True)
    assert [line["id"] for line in lines] == ["ids", "text"]
    assert [line["answer_tokens"] for line in lines] == [3, len(answer)]
    np.testing.assert_allclose([line["log_likelihood"] for line in lines], want.log_likelihood, rtol=1e-6)
    np.testing.assert_allclose([line["stderr"] for line in lines], want.stderr, rtol=1e-6)


def test_cli_end_to_end(tmp_path, exports):
    model, hf_dir = exports["gqa"]
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    r = run_cli("convert", "from-hf", "--input", hf_dir, "--output", ckpt, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    r = run_cli("convert", "to-hf", "--input", ckpt, "--output", back, "--max_shard_size", "50KB")
    assert r.returncode == 0, r.stderr
    assert f"wrote {back}" in r.stdout
    assert len([f for f in os.listdir(back) if f.endswith(".safetensors")]) > 2
    for k, v in hf_state_dict(model).items():
        np.testing.assert_array_equal(TensorReader(back).read(k), v.astype(jnp.bfloat16))
    assert json.load(open(os.path.join(back, "config.json")))["torch_dtype"] == "bfloat16"

    r = run_cli("convert", "from-hf", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "no such model directory" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("convert", "to-hf", "--input", ckpt, "--output", back)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("convert", "to-hf", "--input", ckpt, "--output", str(tmp_path / "y"), "--max_shard_size", "lots")
    assert r.returncode == 2 and "cannot parse size" in r.stderr and not os.path.exists(tmp_path / "y")
