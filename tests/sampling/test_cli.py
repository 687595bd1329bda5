"""`llada-jax sample` and `llada-jax inference` end to end on a tiny saved model with a tiny tokenizer."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llada_jax import generate
from llada_jax.cli import main
from llada_jax.sampling import chat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--gen_length", "8", "--block_length", "4", "--steps", "4"]
def cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "llada_jax", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


RECORDS = [
    {"id": "a", "input_ids": [5, 6, 7]},
    {"id": "b", "prompt": "The quick brown fox"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"id": 4, "input_ids": list(range(10, 40))},
    {"id": "e", "prompt": "Hello"},
]


def test_sample_end_to_end_then_resume_gives_the_same_lines(saved):
    run, model, tokenizer, base = saved
    src = write_jsonl(base / "in.jsonl", RECORDS)
    full = str(base / "full.jsonl")
    args = ["sample", "--model", run, "--input", src, "--batch_size", "2", "--seed", "3", "--temperature", "0.7",
            *FLAGS]
    result = cli(*args, "--output", full)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in open(full, encoding="utf-8")]
    assert len(lines) == 5
    assert [line.get("id") for line in lines] == ["a", "b", None, 4, "e"]
    for line in lines:
        assert len(line["output_ids"]) == 8 and line["nfe"] == 4 and isinstance(line["text"], str)
        assert line["text"] == tokenizer.decode(line["output_ids"], skip_special_tokens=True)

    # A run that died in the middle of line 3: resume keeps lines 1-2, cuts the torn line, redoes the rest.
    part = str(base / "part.jsonl")
    text = open(full, encoding="utf-8").read().splitlines(keepends=True)
    with open(part, "w", encoding="utf-8") as f:
        f.write("".join(text[:2]) + text[2][:15])
    assert main([*args, "--output", part, "--no_progress"]) == 2  # exists: needs --resume
    assert main([*args, "--output", part, "--no_progress", "--resume"]) == 0
    assert open(part, encoding="utf-8").read() == open(full, encoding="utf-8").read()

    # Greedy output of the raw-ids line equals the API's.
    greedy = str(base / "greedy.jsonl")
    assert main(["sample", "--model", run, "--input", src, "--output", greedy, "--no_progress", *FLAGS]) == 0
    first = json.loads(open(greedy, encoding="utf-8").readline())
    want = generate(model, np.array([[5, 6, 7]]), gen_length=8, block_length=4, steps=4)
    assert first["output_ids"] == np.asarray(want)[0, 3:].tolist()


def test_inference_prompt_answers_through_the_chat_template(saved, capsys):
    run, model, tokenizer, _ = saved
    assert main(["inference", "--model", run, "--prompt", "Hello there", "--sampling_method", "fixed_length",
                 "--remasking_strategy", "low_confidence", *FLAGS]) == 0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = generate(model, np.array([ids]), method="fixed_length", gen_length=8, steps=4)
    answer = tokenizer.decode(np.asarray(out)[0, len(ids):], skip_special_tokens=True)
    assert capsys.readouterr().out == answer + "\n"
    # the fast-decoding options reach the sampler the same way
    fast = dict(threshold=0.3, cache="prefix", cache_refresh=2)
    assert main(["inference", "--model", run, "--prompt", "Hello there", "--sampling_method", "fixed_length",
                 "--threshold", "0.3", "--cache", "prefix", "--cache_refresh", "2", *FLAGS]) == 0
    out = generate(model, np.array([ids]), method="fixed_length", gen_length=8, steps=4, **fast)
    answer = tokenizer.decode(np.asarray(out)[0, len(ids):], skip_special_tokens=True)
    assert capsys.readouterr().out == answer + "\n"


def test_interactive_chat_keeps_the_conversation(saved, monkeypatch, capsys):
    run, model, tokenizer, _ = saved
    turns = []
    real_reply = chat.Chat.reply

    def reply(self, text):
        turns.append(list(self.messages))
        return real_reply(self, text)

    monkeypatch.setattr(chat.Chat, "reply", reply)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nWhat is the capital of France?\n/reset\nHello\n"))
    assert main(["inference", "--model", run, "--interactive", *FLAGS]) == 0
    out = capsys.readouterr().out
    assert out.count("LLaDA: ") == 3 and "(conversation cleared)" in out
    assert [len(t) for t in turns] == [0, 2, 0]  # the second turn sees the first exchange; /reset clears
    assert turns[1][0] == {"role": "user", "content": "Hi"} and turns[1][1]["role"] == "assistant"


def test_bad_input_is_a_clear_error(saved, tmp_path, capsys):
    run, *_ = saved
    good = write_jsonl(tmp_path / "good.jsonl", [{"input_ids": [1, 2]}])

    def fails(args, message):
        assert main(["sample", "--model", run, "--output", str(tmp_path / "o.jsonl"), "--no_progress", *args]) == 2
        err = capsys.readouterr().err
        assert message in err, err

    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", run, "--input", good, "--output", "x", "--sampling_method", "diagonal"])
    assert e.value.code == 2 and "invalid choice: 'diagonal'" in capsys.readouterr().err
    fails(["--input", good, "--gen_length", "10", "--block_length", "4"],
          "--gen_length 10 is not divisible by block_length 4")
    fails(["--input", good, "--gen_length", "16", "--block_length", "4", "--steps", "6"],
          "--steps 6 is not divisible by the number of blocks 4")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1]}, '{"input_ids": [1, 2'])
    fails(["--input", bad, *FLAGS], "bad.jsonl line 2: invalid JSON")
    fails(["--input", write_jsonl(tmp_path / "f.jsonl", [{"text": "hi"}]), *FLAGS],
          "f.jsonl line 1: expected exactly one of ['input_ids', 'prompt', 'messages']")
    fails(["--input", write_jsonl(tmp_path / "t.jsonl", [{"input_ids": ["a"]}]), *FLAGS],
          "t.jsonl line 1: 'input_ids' must be a non-empty list")
    fails(["--input", write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}]), *FLAGS],
          "m.jsonl line 1: 'messages' must be")
    fails(["--input", write_jsonl(tmp_path / "long.jsonl", [{"input_ids": [1]}, {"input_ids": [1] * 90}]), *FLAGS],
          "long.jsonl line 2: the prompt has 90 tokens; with --gen_length 8 at most 88 fit the model's "
          "max_sequence_length 96")
    fails(["--input", str(tmp_path / "missing.jsonl"), *FLAGS], "--input: ")
    assert main(["inference", "--model", str(tmp_path / "nope"), "--prompt", "x", *FLAGS]) == 2
    assert "--model: " in capsys.readouterr().err


def test_sample_with_threshold_and_cache_equals_the_api(saved, tmp_path, capsys):
    run, model, _, _ = saved
    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [9, 10, 11, 12]}])
    fast = ["--threshold", "0.5", "--cache", "dual", "--cache_refresh", "2"]
    out = str(tmp_path / "out.jsonl")
    assert main(["sample", "--model", run, "--input", src, "--output", out, "--no_progress", *FLAGS, *fast]) == 0
    lines = [json.loads(line) for line in open(out, encoding="utf-8")]
    want, stats = generate(model, np.array([[5, 6, 7]]), gen_length=8, block_length=4, threshold=0.5, cache="dual",
                           cache_refresh=2, return_stats=True)
    assert lines[0]["output_ids"] == np.asarray(want)[0, 3:].tolist() and lines[0]["nfe"] == int(stats.nfe[0])
    assert main(["sample", "--model", run, "--input", src, "--output", str(tmp_path / "x.jsonl"), *FLAGS,
                 "--threshold", "-1"]) == 2
    assert "--threshold must be a finite number >= 0" in capsys.readouterr().err


def test_a_model_without_pad_or_eos_is_one_clear_error(saved, tmp_path, capsys):
    """Issue 28: prompts are left-padded with the model's pad_token_id, else its eos_token_id (LLaDA pads with its
    EOS); a model with neither crashed mid-run (TypeError). sample and inference say which field is missing and in
    which file, exit 2, before anything is written."""
    from flax import nnx

    from llada_jax import LLaDAForMaskedLM
    from llada_jax.checkpoints.orbax_model import save_model

    run, model, _, base = saved
    config = model.config.replace(eos_token_id=None, pad_token_id=None)
    hf = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0)).save_pretrained(str(tmp_path / "hf"))  # no tokenizer
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"input_ids": [5, 6, 7]}])
    out = tmp_path / "o.jsonl"
    assert main(["sample", "--model", hf, "--input", prompts, "--output", str(out), "--no_progress", *FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"llada-jax sample: error: --model: {os.path.join(hf, 'config.json')}: pad_token_id "), err
    assert "eos_token_id" in err and not out.exists()
    orbax = save_model(LLaDAForMaskedLM(config, rngs=nnx.Rngs(0)), str(tmp_path / "run"),
                       tokenizer_dir=str(base / "tok"))
    assert main(["inference", "--model", orbax, "--prompt", "Hello", *FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llada-jax inference: error: --model: ") and "model_config: pad_token_id " in err, err
