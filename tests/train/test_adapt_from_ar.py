"""Pretraining from an autoregressive checkpoint (a tiny random Qwen2 with q/k/v biases, in the transformers
layout): the run learns with shift_logits, resumes bit for bit, writes the tokenizer with its mask token,
samples, and exports a LLaDA directory that transformers loads with the same logits."""

import json
import os
import signal

import numpy as np

from llada_jax.train.metrics import read_metrics
from tests.checkpoints.ar_helpers import TEXTS, make_ar_dir
from tests.runs import TINY, cli


def _losses(run):
    return [(m["step"], m["loss"], m["batch_checksum"]) for m in read_metrics(run) if "loss" in m]


def test_pretrain_from_qwen2_with_shift_learns_resumes_samples_and_exports(tmp_path):
    ar, _, n_tok = make_ar_dir(str(tmp_path / "qwen2"), "qwen2")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    def pretrain(out, *extra, **kw):
        return cli("pretrain", "--config", TINY, "--model_name_or_path", ar, "--data_path", str(data),
                   "--output_dir", out, "--max_steps", "24", "--batch_size", "8", "--max_length", "32",
                   "--save_steps", "8", "--logging_steps", "1", "--warmup_steps", "2", "--learning_rate", "3e-3",
                   "--config.gradient_accumulation_steps=1", "--config.checkpoint.async_save=false",
                   "--config.model.shift_logits=true", "--config.adaptation.mask_annealing_steps=12", *extra, **kw)

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    pretrain(straight)
    killed = pretrain(resumed, kill_after_step=12, check=False)
    assert killed.returncode == -signal.SIGKILL
    pretrain(resumed)
    a, b = _losses(straight), _losses(resumed)
    assert [s for s, _, _ in a] == list(range(1, 25)) and a == b  # bit-identical across the resume
    first, last = np.mean([x for _, x, _ in a[:4]]), np.mean([x for _, x, _ in a[-4:]])
    assert last < 0.8 * first, (first, last)  # it learns

    saved = json.load(open(os.path.join(straight, "config.json")))["model"]
    assert saved["shift_logits"] is True and saved["include_qkv_bias"] is True
    assert saved["attention_type"] == "bidirectional" and saved["mask_token_id"] == n_tok
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(straight, "tokenizer"))
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == n_tok  # the run's tokenizer has the mask token

    # the adapted run samples ...
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t[:20]}) + "\n" for t in TEXTS[:2]))
    out = tmp_path / "samples.jsonl"
    cli("sample", "--model", straight, "--input", str(prompts), "--output", str(out), "--gen_length", "8",
        "--steps", "8", "--block_length", "8", devices=1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:  # eight committed tokens of the model's vocabulary, decoded by the run's tokenizer
        assert len(r["output_ids"]) == 8 and all(0 <= i < n_tok for i in r["output_ids"]) and r["text"] is not None

    # ... and exports the official layout, which transformers loads with the JAX model's logits
    hf = str(tmp_path / "hf")
    cli("convert", "to-hf", "--input", straight, "--output", hf, devices=1)
    config = json.load(open(os.path.join(hf, "config.json")))
    assert (config["model_type"], config["include_qkv_bias"], config["shift_logits"]) == ("llada", True, True)
    assert AutoTokenizer.from_pretrained(hf).convert_tokens_to_ids("<|mdm_mask|>") == n_tok

    import jax.numpy as jnp
    import torch
    from transformers import AutoModel

    from llada_jax import LLaDAForMaskedLM

    jax_model = LLaDAForMaskedLM.from_pretrained(straight)
    ids = np.random.RandomState(0).randint(3, n_tok, (2, 12))
    ids[:, 3] = n_tok  # masks, as the model sees them
    ours = np.asarray(jax_model(jnp.asarray(ids)))
    torch_model = AutoModel.from_pretrained(hf, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = torch_model(torch.tensor(ids)).logits.float().numpy()
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 1e-4


def test_the_seed_flow_create_configs_then_pretrain_from_a_llama_directory(tmp_path):
    """create-configs, model_name_or_path set in pretraining_config.json to a LLaMA-format directory, pretrain."""
    ar, hf_model, n_tok = make_ar_dir(str(tmp_path / "llama"), "llama")
    cli("create-configs", "--output_dir", str(tmp_path / "cfg"), devices=1)
    path = tmp_path / "cfg" / "pretraining_config.json"
    raw = json.loads(path.read_text())
    raw["pretraining"]["model_name_or_path"] = ar
    path.write_text(json.dumps(raw))
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run = str(tmp_path / "run")
    cli("pretrain", "--config", str(path), "--data_path", str(data), "--output_dir", run, "--max_steps", "2",
        "--batch_size", "8", "--max_length", "32", "--config.gradient_accumulation_steps=1", "--learning_rate", "0",
        "--config.checkpoint.async_save=false", "--config.model.dtype=float32", devices=1)
    model = json.load(open(os.path.join(run, "config.json")))["model"]
    assert (model["d_model"], model["n_layers"], model["mask_token_id"]) == (64, 2, n_tok)  # the LLaMA's, not 8B's
    assert np.isfinite([m["loss"] for m in read_metrics(run) if "loss" in m]).all()
    # the run started from the LLaMA weights (learning rate 0: they are still the checkpoint's)
    from llada_jax import LLaDAForMaskedLM

    trained = LLaDAForMaskedLM.from_pretrained(run)
    np.testing.assert_array_equal(np.asarray(trained.wte[...])[:n_tok],
                                  hf_model.model.embed_tokens.weight.detach().numpy())


def test_a_qwen2_without_special_ids_is_refused_by_name_and_with_an_eos_it_trains_and_samples(tmp_path):
    """Issue 28: a Qwen2 saved by transformers 5 with its defaults (bos / eos / pad null) and no tokenizer trained
    (documents joined with no EOS) and then `sample` crashed on the missing pad id (TypeError). Training refuses a
    model without an EOS, naming the field and the file, before anything is written; with eos_token_id in
    config.json and no pad_token_id the run pads with its EOS (LLaDA's convention), records it, and samples."""
    from tests.checkpoints.ar_helpers import edit_config

    ar, _, _ = make_ar_dir(str(tmp_path / "qwen2"), "qwen2", tokenizer=False, bos_token_id=None, eos_token_id=None)
    data = tmp_path / "ids.jsonl"
    rs = np.random.RandomState(0)
    data.write_text("".join(json.dumps({"input_ids": rs.randint(3, 250, 40).tolist()}) + "\n" for _ in range(40)))
    run = tmp_path / "run"

    def pretrain():
        return cli("pretrain", "--config", TINY, "--model_name_or_path", ar, "--data_path", str(data),
                   "--output_dir", str(run), "--max_steps", "3", "--batch_size", "8", "--max_length", "32",
                   "--config.gradient_accumulation_steps=1", "--config.checkpoint.async_save=false",
                   "--config.model.shift_logits=true", check=False, devices=1)

    proc = pretrain()
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eos_token_id" in error and os.path.join(ar, "config.json") in error and "Traceback" not in proc.stderr
    assert not run.exists()

    edit_config(ar, eos_token_id=2)  # what the message asks for
    proc = pretrain()
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.load(open(run / "config.json"))["model"]
    assert (saved["eos_token_id"], saved["pad_token_id"], saved["bos_token_id"]) == (2, 2, None)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"input_ids": [8, 9]}) + "\n")
    out = tmp_path / "samples.jsonl"
    proc = cli("sample", "--model", str(run), "--input", str(prompts), "--output", str(out), "--gen_length", "8",
               "--steps", "8", "--block_length", "8", check=False, devices=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [len(json.loads(line)["output_ids"]) for line in out.read_text().splitlines()] == [8, 8]
