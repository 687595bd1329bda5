"""DatasetConverter and the `llada-jax data convert` / `data check` commands."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.cli import main
from llada_jax.config import LLaDAConfig
from llada_jax.data.converters import DatasetConverter
from llada_jax.data.pipeline import make_train_iterator
from llada_jax.errors import DataError
from tests.data.datahelpers import tiny_train_config, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                       {"from": "gpt", "value": "Paris."},
                       {"from": "human", "value": "And of Italy?"},
                       {"from": "gpt", "value": "Rome."}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hello"},
                       {"from": "assistant", "value": "Hello world!"}]},
]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "llada_jax", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_convert_sharegpt_cli_writes_one_example_per_turn(tmp_path, tokenizer_dir, helper):
    src = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    out = tmp_path / "out" / "sft.jsonl"
    r = run_cli("data", "convert", "--format", "sharegpt", "--tokenizer", tokenizer_dir, src, str(out))
    assert r.returncode == 0, r.stderr
    assert "2 records -> 3 examples" in r.stdout
    lines = read_jsonl(out)
    e = helper.encode
    gen = [506] + e("assistant") + [507] + e("\n\n")
    p1 = [509, 506] + e("user") + [507] + e("\n\nWhat is the capital of France?") + [508] + gen
    assert lines[0] == {"input_ids": p1 + e("Paris.") + [508], "prompt_length": len(p1)}
    assert [len(x["input_ids"]) - x["prompt_length"] for x in lines] == [len(e("Paris.")) + 1, len(e("Rome.")) + 1,
                                                                          len(e("Hello world!")) + 1]
    assert os.listdir(out.parent) == ["sft.jsonl"]  # written atomically: no temporary file left
    # Training on the converted file gives the same rows as training on the chats themselves.
    rows = []
    for path, tok in ((src, tokenizer_dir), (str(out), "")):
        c = tiny_train_config(path, tmp_path, task="sft", max_length=96, batch_size=3, shuffle=False, tokenizer=tok,
                              num_shards=1)
        rows.append(next(make_train_iterator(c, LLaDAConfig.tiny())))
    for key in rows[0]:
        assert np.array_equal(rows[0][key], rows[1][key])


def test_convert_alpaca_and_openai(tmp_path, helper):
    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a city.", "input": "In France.", "output": "Paris"},
                                  {"instruction": "Say hi.", "input": "", "output": "Hi"}], indent=2))
    conv = DatasetConverter(helper)
    report = conv.convert_alpaca_to_llada(str(alpaca), str(tmp_path / "a.jsonl"))
    assert (report.records, report.examples) == (2, 2)
    e = helper.encode
    first = read_jsonl(tmp_path / "a.jsonl")[0]
    prompt = [509, 506] + e("user") + [507] + e("\n\nName a city.\n\nIn France.") + [508, 506] + e("assistant") + \
        [507] + e("\n\n")
    assert first == {"input_ids": prompt + e("Paris") + [508], "prompt_length": len(prompt)}
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]}])
    report = conv.convert_openai_to_llada(msgs, str(tmp_path / "m_out.jsonl"))
    assert report.examples == 1 and report.tokens == len(read_jsonl(tmp_path / "m_out.jsonl")[0]["input_ids"])
    # The layout is enforced: an Alpaca file is not ShareGPT.
    with pytest.raises(DataError, match=r"alpaca_data.json, item 0: field 'conversations': missing"):
        conv.convert_sharegpt_to_llada(str(alpaca), str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()


def test_convert_bad_input_exits_nonzero_and_writes_nothing(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT + [{"conversations": [{"from": "human", "value": "hi"}]}])
    out = tmp_path / "out.jsonl"
    code = main(["data", "convert", "--format", "sharegpt", "--tokenizer", tokenizer_dir, src, str(out)])
    assert code == 1 and not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    report = DatasetConverter(tokenizer_dir, skip_invalid=True).convert_sharegpt_to_llada(src, str(out))
    assert report.examples == 3 and report.skipped.counts["invalid"] == 1
    assert report.skipped.examples == [f"[invalid] {src}, line 3: field 'conversations': no assistant turn "
                                       "(nothing to train on)"]


def test_convert_cli_error_message_and_usage_errors(tmp_path, tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", ['{"conversations": [{"from": "bot", "value": "x"}]}'])
    assert main(["data", "convert", "--format", "sharegpt", "--tokenizer", tokenizer_dir, src,
                 str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"llada-jax data convert: error: {src}, line 1: field 'conversations[0].from': unknown role 'bot'" in err
    assert main(["data", "convert", "--format", "sharegpt", "--tokenizer", str(tmp_path / "none"), src,
                 str(tmp_path / "o.jsonl")]) == 2
    assert "not a local directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "convert", "--format", "csv", "--tokenizer", tokenizer_dir, src, "o"])
    assert e.value.code == 2


def test_convert_missing_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    missing, out = str(tmp_path / "missing.jsonl"), tmp_path / "out" / "sft.jsonl"
    assert main(["data", "convert", "--format", "sharegpt", "--tokenizer", tokenizer_dir, missing, str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"llada-jax data: error: {missing}: no such file"]
    assert not out.parent.exists()


def test_check_pretrain_prints_counts_and_percentiles(tmp_path):
    lengths = [3, 8, 1, 20, 5, 5, 12]
    a = write_jsonl(tmp_path / "a.jsonl", [{"input_ids": [7] * n} for n in lengths[:4]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"input_ids": [7] * n} for n in lengths[4:]])
    r = run_cli("data", "check", "--kind", "pretrain", "--vocab_size", "512", "--mask_token_id", "511", a, b)
    assert r.returncode == 0, r.stderr
    p = {q: int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99)}
    assert r.stdout.splitlines() == [
        f"checked 2 file(s) as pretrain data: 7 records, 7 documents, {sum(lengths)} tokens",
        f"document length: min 1, p50 {p[50]}, p90 {p[90]}, p99 {p[99]}, max 20, mean {np.mean(lengths):.1f}",
        "checked: vocabulary 512, mask token 511",
        "OK: no problems",
    ]


def test_check_lists_problems_up_to_the_limit_and_counts_all(tmp_path):
    good = json.dumps({"input_ids": [1, 2]})
    f = write_jsonl(tmp_path / "bad.jsonl", [good, '{"input_ids": [1, 600]}', "{broken", good,
                                              '{"input_ids": [511]}', '{"input_ids": []}'])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli("data", "check", "--kind", "pretrain", "--vocab_size", "512", "--mask_token_id", "511",
                "--max_problems", "3", f, str(empty), str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1
    out = r.stdout.splitlines()
    assert "6 problem(s) (the first 3 shown):" in out
    shown = out[out.index("6 problem(s) (the first 3 shown):") + 1:]
    assert shown == [f"  {tmp_path / 'missing.jsonl'}: no such file (or no file matches this pattern)",
                     f"  {f}, line 2: field 'input_ids': position 1: id 600 is outside the vocabulary (size 512)",
                     f"  {f}, line 3: malformed JSON: Expecting property name enclosed in double quotes (column 2)"]
    assert out[0] == "checked 2 file(s) as pretrain data: 6 records, 2 documents, 4 tokens"


def test_check_sft_with_tokenizer_and_max_length(tmp_path, tokenizer_dir, helper, capsys):
    f = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT + [{"input_ids": [509, 5, 6], "prompt_length": 1}])
    code = main(["data", "check", "--kind", "sft", "--tokenizer", tokenizer_dir, "--max_length", "40", f])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    from llada_jax.data.formats import SftFormat
    from llada_jax.data.sources import iter_records

    fmt = SftFormat(vocab_size=512, mask_token_id=511, eos_token_id=510, tokenizer=helper)
    lengths = [len(ids) for r in iter_records(f) for ids in fmt(r).ids]
    assert out[0] == f"checked 1 file(s) as sft data: 3 records, 4 examples, {sum(lengths)} tokens"
    assert "checked: vocabulary 512, mask token 511" in out
    assert f"{sum(n > 40 for n in lengths)} examples longer than max_length 40" in out
    # Chats without a tokenizer: a usage error (exit 2), not a data problem.
    assert main(["data", "check", "--kind", "sft", f]) == 2
    assert "chat records need a tokenizer" in capsys.readouterr().err


def test_data_commands_are_listed():
    r = run_cli("--help")
    assert r.returncode == 0 and "data" in r.stdout and "model-info" in r.stdout


def test_building_the_parser_loads_no_data_libraries():
    code = ("import sys; from llada_jax.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('grain', 'transformers', 'tensorflow_datasets', 'tokenizers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
