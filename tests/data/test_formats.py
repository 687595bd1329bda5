"""Record formats: pretraining documents, SFT examples (pre-tokenized and chats), too-long policies, bad input."""

import json

import numpy as np
import pytest

from llada_jax.data.formats import (
    Document,
    Examples,
    PretrainFormat,
    SftFormat,
    Skipped,
)
from llada_jax.data.skips import INVALID, TOO_LONG, TRUNCATED
from llada_jax.data.sources import RawRecord
from llada_jax.errors import DataError

IDS = dict(vocab_size=512, mask_token_id=511, eos_token_id=510, bos_token_id=509)


def rec(obj, line=7, path="data/f.jsonl"):
    return RawRecord(obj if isinstance(obj, bytes) else (obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()),
                     path, line)


def pretrain(**kw):
    return PretrainFormat(**{**IDS, **kw})


def sft(helper=None, **kw):
    return SftFormat(**{**IDS, "tokenizer": helper, **kw})


# ----------------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------------

def test_pretrain_input_ids_get_one_eos(helper):
    doc = pretrain()(rec({"input_ids": [5, 6, 7]}))
    assert isinstance(doc, Document) and doc.tokens.dtype == np.int32
    assert doc.tokens.tolist() == [5, 6, 7, 510] and doc.source_length == 3
    assert pretrain()(rec({"input_ids": [5, 510]})).tokens.tolist() == [5, 510]  # already ends with EOS
    text = "A quick brown fox jumps over the lazy dog."
    doc = pretrain(tokenizer=helper)(rec({"text": text}))
    assert doc.tokens.tolist() == helper.encode(text) + [510]
    # TFDS records arrive as dicts with numpy arrays and bytes.
    tf = RawRecord({"input_ids": np.array([3, 4], np.int64)}, "tfds:x:train", 2, "record")
    assert pretrain()(tf).tokens.tolist() == [3, 4, 510]
    assert pretrain(tokenizer=helper)(RawRecord({"text": b"Hello"}, "tfds:x:train", 0, "record")).tokens.tolist() == \
        helper.encode("Hello") + [510]


PRETRAIN_BAD = [
    ('{"input_ids": [1, 2', "", "malformed JSON: Expecting ',' delimiter (column 20)"),
    ("[1, 2, 3]", "", "expected a JSON object, got array"),
    ({"ids": [1]}, "input_ids", "missing (a pretraining record needs 'input_ids' or 'text')"),
    ({"input_ids": "1 2 3"}, "input_ids", "expected a list of token ids, got string"),
    ({"input_ids": []}, "input_ids", "is empty"),
    ({"input_ids": [1, 2.5]}, "input_ids", "position 1: 2.5 (number) is not an integer token id"),
    ({"input_ids": [1, "2"]}, "input_ids", 'position 1: "2" (string) is not an integer token id'),
    ({"input_ids": [1, None]}, "input_ids", "position 1: null (null) is not an integer token id"),
    ({"input_ids": [1, True]}, "input_ids", "position 1: true is not a token id"),
    ({"input_ids": [[1, 2], [3, 4]]}, "input_ids", "got nested lists"),
    ({"input_ids": [[1], [2, 3]]}, "input_ids", "expected a flat list of integer token ids"),
    ({"input_ids": [4, -1]}, "input_ids", "position 1: negative token id -1"),
    ({"input_ids": [4, 512]}, "input_ids", "position 1: id 512 is outside the vocabulary (size 512)"),
    ({"input_ids": [4, 2**70]}, "input_ids", f"position 1: {2**70} is not a valid token id (out of range)"),
    ({"input_ids": [4, 8, 511]}, "input_ids", "position 2: the mask token 511 inside clean data"),
    ({"text": 5}, "text", "expected a string, got integer"),
    ({"text": ""}, "text", "is empty"),
]


@pytest.mark.parametrize("record,field,message", PRETRAIN_BAD)
def test_pretrain_bad_records_name_file_line_and_field(record, field, message):
    with pytest.raises(DataError) as e:
        pretrain()(rec(record))
    assert e.value.where == "data/f.jsonl, line 7" and e.value.field == field
    assert message in str(e.value)
    assert str(e.value).startswith("data/f.jsonl, line 7: " + (f"field '{field}': " if field else ""))
    skipped = pretrain(skip_invalid=True)(rec(record))
    assert isinstance(skipped, Skipped) and [ev.kind for ev in skipped.events] == [INVALID]
    assert skipped.events[0].where == "data/f.jsonl, line 7" and message in skipped.events[0].message


def test_text_mask_token_and_missing_tokenizer(helper):
    with pytest.raises(DataError, match=r"field 'text': position 1: the mask token 511"):
        pretrain(tokenizer=helper)(rec({"text": "Hello<|mdm_mask|>"}))
    with pytest.raises(ValueError, match="records need a tokenizer") as e:
        pretrain(skip_invalid=True)(rec({"text": "Hello"}))  # configuration, never skipped
    assert not isinstance(e.value, DataError)


def test_not_utf8_is_reported():
    with pytest.raises(DataError, match="line 7: .*(not UTF-8|malformed JSON)"):
        pretrain()(rec(b'{"text": "\xff\xfe"}'))


# ----------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------

def test_pretokenized_sft_example():
    ex = sft()(rec({"input_ids": [509, 5, 6, 7, 8], "prompt_length": 3}))
    assert isinstance(ex, Examples)
    assert [x.tolist() for x in ex.ids] == [[509, 5, 6, 7, 8]] and ex.prompt_lengths == (3,) and ex.events == ()


def expected_chat_pair(helper, prior, answer):
    """The example for one assistant turn, built by hand from the template's pieces."""
    e = helper.encode
    prompt = [509]
    for role, content in prior:
        prompt += [506] + e(role) + [507] + e("\n\n" + content.strip()) + [508]
    prompt += [506] + e("assistant") + [507] + e("\n\n")
    return prompt, e(answer.strip()) + [508]


DIALOGUE = [("system", "You are brief."), ("user", "What is the capital of France?"),
            ("assistant", "The capital of France is Paris."), ("user", "And of Italy?"), ("assistant", " Rome. ")]


@pytest.mark.parametrize("layout", ["sharegpt", "openai"])
def test_chat_yields_one_example_per_assistant_turn(helper, layout):
    if layout == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        record = {"conversations": [{"from": names[r], "value": c} for r, c in DIALOGUE]}
    else:
        record = {"messages": [{"role": r, "content": c} for r, c in DIALOGUE]}
    ex = sft(helper)(rec(record))
    p1, a1 = expected_chat_pair(helper, DIALOGUE[:2], DIALOGUE[2][1])
    p2, a2 = expected_chat_pair(helper, DIALOGUE[:4], DIALOGUE[4][1])
    assert [x.tolist() for x in ex.ids] == [p1 + a1, p2 + a2]
    assert ex.prompt_lengths == (len(p1), len(p2))
    assert helper.decode(a2) == "Rome.<|eot_id|>"
    # The second prompt holds the first answer exactly as the template writes it.
    assert helper.decode(p2).endswith("Paris.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?"
                                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_alpaca_and_openai_text_parts(helper):
    ex = sft(helper)(rec({"instruction": "Name a city.", "input": "In France.", "output": "Paris"}))
    p, a = expected_chat_pair(helper, [("user", "Name a city.\n\nIn France.")], "Paris")
    assert ex.ids[0].tolist() == p + a and ex.prompt_lengths == (len(p),)
    ex = sft(helper)(rec({"instruction": "Name a city.", "input": "", "output": "Paris"}))
    p, a = expected_chat_pair(helper, [("user", "Name a city.")], "Paris")
    assert ex.ids[0].tolist() == p + a
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": "Hello"}]}
    p, a = expected_chat_pair(helper, [("user", "Hi there")], "Hello")
    assert sft(helper)(rec(parts)).ids[0].tolist() == p + a


SFT_BAD = [
    ({"input_ids": [1, 2, 3]}, "prompt_length", "missing"),
    ({"prompt_length": 1}, "input_ids", "missing"),
    ({"input_ids": [1, 2, 3], "prompt_length": 0}, "prompt_length", "0 < prompt_length < len(input_ids) = 3"),
    ({"input_ids": [1, 2, 3], "prompt_length": -2}, "prompt_length", "got -2"),
    ({"input_ids": [1, 2, 3], "prompt_length": 3}, "prompt_length", "0 < prompt_length < len(input_ids) = 3"),
    ({"input_ids": [1, 2, 3], "prompt_length": "1"}, "prompt_length", "expected an integer, got string"),
    ({"input_ids": [1, 2, 3], "prompt_length": True}, "prompt_length", "expected an integer, got boolean"),
    ({"input_ids": [1, 511, 3], "prompt_length": 1}, "input_ids", "position 1: the mask token 511"),
    ({"input_ids": [1, 900, 3], "prompt_length": 1}, "input_ids", "id 900 is outside the vocabulary"),
    ({"text": "hi"}, "input_ids", "an SFT record needs 'input_ids' and 'prompt_length', 'conversations'"),
    ({"conversations": "hi"}, "conversations", "expected a list of messages, got string"),
    ({"conversations": []}, "conversations", "is empty (no assistant turn)"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations", "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "hi"}, "oops"]}, "conversations[1]", "expected an object, got string"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "conversations[0].from", "unknown role 'bot'"),
    ({"conversations": [{"from": "gpt"}]}, "conversations[0].value", "missing"),
    ({"conversations": [{"value": "x"}]}, "conversations[0].from", "missing"),
    ({"conversations": [{"from": "gpt", "value": None}]}, "conversations[0].value", "expected a string, got null"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}, "messages[1].role",
     "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}, "messages[1].content",
     "expected a string, got integer"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content[0]", "only text parts"),
    ({"messages": [{"role": "user", "content": "a <|mdm_mask|> b"}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "the mask token 511"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<|mdm_mask|>"}]},
     "messages[1].content", "position 0: the mask token 511"),
    ({"instruction": "x"}, "output", "missing"),
    ({"instruction": "x", "input": 4, "output": "y"}, "input", "expected a string, got integer"),
]


@pytest.mark.parametrize("record,field,message", SFT_BAD)
def test_sft_bad_records_name_file_line_and_field(helper, record, field, message):
    with pytest.raises(DataError) as e:
        sft(helper)(rec(record, line=12))
    assert e.value.where == "data/f.jsonl, line 12" and e.value.field == field, str(e.value)
    assert message in str(e.value)
    skipped = sft(helper, skip_invalid=True)(rec(record, line=12))
    assert isinstance(skipped, Skipped) and skipped.events[0].kind == INVALID and skipped.events[0].field == field


def test_chat_without_tokenizer_is_a_configuration_error():
    with pytest.raises(ValueError, match="chat records need a tokenizer"):
        sft(skip_invalid=True)(rec({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))


# ----------------------------------------------------------------------------------------------------
# Too long
# ----------------------------------------------------------------------------------------------------

LONG = {"input_ids": [509] + list(range(1, 10)) + [100, 101, 102], "prompt_length": 10}  # 10 + 3 = 13 tokens


def test_too_long_error_names_the_example():
    with pytest.raises(DataError) as e:
        sft(max_length=8)(rec(LONG))
    assert str(e.value) == ("data/f.jsonl, line 7: field 'input_ids': example of 13 tokens (prompt 10 + answer 3) is "
                            "longer than max_length 8; set data.too_long to 'skip' or 'truncate_prompt'")
    assert sft(max_length=13)(rec(LONG)).ids[0].tolist() == LONG["input_ids"]  # exactly max_length fits


def test_too_long_skip_counts_the_example(helper):
    ex = sft(max_length=8, too_long="skip")(rec(LONG))
    assert ex.ids == [] and [(e.kind, e.field) for e in ex.events] == [(TOO_LONG, "input_ids")]
    # In a dialogue only the long turn is skipped.
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello again"}]}
    full = sft(helper)(rec(record))
    limit = len(full.ids[0])
    ex = sft(helper, max_length=limit, too_long="skip")(rec(record))
    assert [x.tolist() for x in ex.ids] == [full.ids[0].tolist()]
    assert [(e.kind, e.field) for e in ex.events] == [(TOO_LONG, "messages[3].content")]


def test_truncate_prompt_keeps_bos_and_the_whole_answer():
    ex = sft(max_length=8, too_long="truncate_prompt")(rec(LONG))
    # The prompt [509, 1..9] keeps BOS and its last 4 tokens; the answer [100, 101, 102] is intact.
    assert ex.ids[0].tolist() == [509, 6, 7, 8, 9, 100, 101, 102] and ex.prompt_lengths == (5,)
    assert [(e.kind, e.message) for e in ex.events] == [(TRUNCATED, "prompt cut from 10 to 5 tokens (max_length 8)")]
    no_bos = {"input_ids": list(range(1, 11)) + [100, 101, 102], "prompt_length": 10}
    assert sft(max_length=8, too_long="truncate_prompt")(rec(no_bos)).ids[0].tolist() == [6, 7, 8, 9, 10, 100, 101, 102]
    with pytest.raises(DataError, match="the answer alone needs 3 tokens: truncating the prompt cannot make it fit "
                                        r"\(the answer is never cut\)"):
        sft(max_length=4, too_long="truncate_prompt")(rec(LONG))
    with pytest.raises(ValueError, match="too_long must be one of"):
        sft(too_long="cut")


def test_units_are_pytrees_so_worker_processes_ship_tokens_in_shared_memory():
    import jax

    doc = pretrain()(rec({"input_ids": [5, 6]}))
    assert [x.tolist() for x in jax.tree_util.tree_leaves(doc)] == [[5, 6, 510]]
    ex = sft()(rec({"input_ids": [1, 2, 3], "prompt_length": 1}))
    assert [x.tolist() for x in jax.tree_util.tree_leaves(ex)] == [[1, 2, 3]]
    assert jax.tree_util.tree_leaves(pretrain(skip_invalid=True)(rec("{"))) == []
