"""`llada-jax pretrain` / `sft` end to end: resume exactness, other meshes, the guard, the CLI's errors."""

import glob
import json
import os
import shutil
import signal
import struct

import numpy as np
import pytest

from llada_jax.train.metrics import read_metrics
from tests.runs import TINY, cli


def common(data, out, steps, *extra):
    return ["pretrain", "--config", TINY, "--data_path", data, "--output_dir", out, "--max_steps", str(steps),
            "--batch_size", "8", "--max_length", "32", "--save_steps", "10", "--logging_steps", "1",
            "--warmup_steps", "5", "--config.checkpoint.async_save=false", *extra]


def losses(run):
    return [(m["step"], m["loss"], m["batch_checksum"]) for m in read_metrics(run) if "loss" in m]


def checkpoint_steps(run):
    root = os.path.join(run, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def tensorboard_scalars(run) -> dict:
    """{(tag, step): value} from the TFRecord event files in run/tensorboard/ (no TensorBoard needed)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):  # record: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = v.simple_value
    return scalars


def test_resume_after_a_kill_is_bitwise_identical(tmp_path, pretrain_data):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    evaluation = (f"--config.eval_data_path={pretrain_data}", "--config.eval_steps=6", "--config.eval_batches=2")
    cli(*common(pretrain_data, straight, 30, "--config.checkpoint.keep=2", *evaluation))
    killed = cli(*common(pretrain_data, resumed, 30, *evaluation), kill_after_step=15, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_steps(resumed) == [10]
    cli(*common(pretrain_data, resumed, 30, *evaluation))  # the same command again: resumes from step 10
    # evaluation every 6 steps and at the end, on the same batches with the same noise: equal in both runs, and
    # falling as the model learns
    evals = [[(m["step"], m["eval_loss"]) for m in read_metrics(run) if "eval_loss" in m] for run in (straight, resumed)]
    assert [s for s, _ in evals[0]] == [6, 12, 18, 24, 30] and evals[0] == evals[1]
    assert evals[0][-1][1] < evals[0][0][1]
    a, b = losses(straight), losses(resumed)
    assert [s for s, _, _ in b] == list(range(1, 31))
    assert a == b  # same losses bit for bit, and the same data (checksums) in the same order
    first, last = np.mean([l for _, l, _ in a[:5]]), np.mean([l for _, l, _ in a[-5:]])
    assert last < first, (first, last)  # and it learns
    # checkpoint.keep: saves at 10, 20, 30; the last 2 are kept (the default 3 keeps all three)
    assert checkpoint_steps(straight) == [20, 30] and checkpoint_steps(resumed) == [10, 20, 30]
    # metrics.jsonl: the documented fields on every logged step
    for row in read_metrics(straight):
        if "eval_loss" in row:  # an evaluation's own row: {"step", "eval_loss"}
            assert set(row) == {"step", "eval_loss"}
            continue
        for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time", "tflops_per_sec",
                    "masked_tokens", "skipped_updates", "batch_checksum"):
            assert key in row and np.isfinite(row[key]), (key, row)
        assert row["step_time"] > 0 and row["tokens_per_sec"] == pytest.approx(8 * 32 / row["step_time"])
    # config.json: the full training config, loadable as a config file
    from llada_jax.config import load_config, train_config

    saved = load_config(os.path.join(straight, "config.json"))
    assert saved.to_dict().keys() == train_config().to_dict().keys()
    assert (saved.max_steps, saved.max_length, saved.checkpoint.keep, saved.model.d_model) == (30, 32, 2, 64)
    # TensorBoard events: every metrics.jsonl scalar, per logged step
    scalars = tensorboard_scalars(straight)
    assert {s for (tag, s) in scalars if tag == "train/loss"} == set(range(1, 31))
    assert scalars[("train/loss", 30)] == pytest.approx(a[-1][1])
    assert ("train/learning_rate", 30) in scalars and ("train/tokens_per_sec", 30) in scalars


def test_continue_a_finished_run_with_more_steps_and_on_another_mesh(tmp_path, pretrain_data):
    same, other = str(tmp_path / "same_mesh"), str(tmp_path / "other_mesh")
    cli(*common(pretrain_data, same, 10, "--config.mesh.fsdp=4", "--config.mesh.tensor=2"))
    done = cli(*common(pretrain_data, same, 10))
    assert "nothing to do" in done.stderr
    # the step's noise comes from (seed, step): resuming with another seed is an error, before any work
    other_seed = cli(*common(pretrain_data, same, 12, "--seed", "1"), check=False)
    assert other_seed.returncode == 2 and "Traceback" not in other_seed.stderr
    error = other_seed.stderr.strip().splitlines()[-1]
    assert error.startswith("llada-jax pretrain: error: ") and "trained with seed 0, but this run has seed 1" in error
    assert checkpoint_steps(same) == [10]
    shutil.copytree(same, other)
    # a larger max_steps continues the finished run: on the same 8-device mesh, and on 4 devices laid out
    # differently (parameters, optimizer moments and the data position restored onto the new mesh)
    cli(*common(pretrain_data, same, 12, "--config.mesh.fsdp=4", "--config.mesh.tensor=2"))
    cli(*common(pretrain_data, other, 12, "--config.mesh.data=2", "--config.mesh.fsdp=-1"), devices=4)
    a, b = losses(same), losses(other)
    assert [s for s, _, _ in b] == list(range(1, 13))
    assert a[:10] == b[:10] and [c for _, _, c in a] == [c for _, _, c in b]
    # steps 11-12 ran on different meshes: equal up to float32 reduction order
    np.testing.assert_allclose([l for _, l, _ in b[10:]], [l for _, l, _ in a[10:]], rtol=1e-4)


def test_nonfinite_guard_stops_the_run(tmp_path, pretrain_data):
    out = str(tmp_path / "diverge")
    # lr 1e39 is inf in float32: the first (finite) update makes the parameters inf / NaN, every later step's
    # loss is NaN and skipped, and the third skip in a row stops the run. A save is due after every step.
    proc = cli(*common(pretrain_data, out, 30, "--learning_rate", "1e39", "--config.max_consecutive_nonfinite=3",
                       "--warmup_steps", "0", "--save_steps", "1"), check=False)
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("llada-jax pretrain: error: stopping at step 4: 3 consecutive steps had a non-finite")
    logged = read_metrics(out)
    assert [m["skipped_updates"] for m in logged] == [0, 1, 2, 3]
    # no checkpoint of the non-finite parameters: none for steps 1-3, none at the stop
    assert checkpoint_steps(out) == []
    assert proc.stderr.count("parameters are not finite; checkpoint NOT written") == 3


@pytest.mark.parametrize("args,message", [
    (["--config.mesh.tensor=3"], "do not divide the 8 devices"),
    (["--batch_size", "6", "--config.mesh.fsdp=8"], "batch_size 6 is not divisible by the 8 data-parallel shards"),
    (["--config.learning_rat=1"], "unknown config key 'learning_rat'"),
    (["--max_steps", "0"], "max_steps must be a positive integer"),
    (["--lr_scheduler_type", "bogus"], "lr_scheduler_type: expected one of ('cosine', 'linear', 'constant', 'wsd')"),
    (["--config.model.remat_policy=bogus"], "model.remat_policy: expected one of"),
    (["--config.model.n_heads=3"], "model.n_heads: d_model 64 is not divisible by n_heads 3"),
    (["--config.data.num_shards=3"], "must be a positive multiple of the 3 data row streams"),
    (["--config.mesh.dcn_data=2"], "mesh.dcn_data 2 must be 1 or the number of processes (1)"),
])
def test_cli_errors_before_any_work(tmp_path, pretrain_data, args, message):
    out = tmp_path / "never"
    proc = cli(*common(pretrain_data, str(out), 5)[:-1], *args, check=False)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]  # one line (after the start-up log line), no traceback
    assert error.startswith("llada-jax pretrain: error: ") and message in error
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def set_dotted(c, key: str, value) -> None:
    """c["a"]["b"] = value for key "a.b"."""
    *groups, name = key.split(".")
    for g in groups:
        c = c[g]
    c[name] = value


@pytest.mark.parametrize("key,value,message", [
    ("lr_scheduler_type", "bogus", "lr_scheduler_type: expected one of"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number >= 0"),
    ("optimizer.min_lr_ratio", 2.0, "optimizer.min_lr_ratio and optimizer.decay_fraction must be in [0, 1]"),
    ("optimizer.b2", 1.0, "optimizer: need 0 <= b1, b2 < 1"),
    ("checkpoint.keep", 0, "checkpoint.keep must be a positive integer"),
    ("max_consecutive_nonfinite", 0, "max_consecutive_nonfinite must be a positive integer"),
    ("model.attention_impl", "flash", "model.attention_impl: expected one of"),
    ("data.pretrain_mode", "x", "data.pretrain_mode: expected one of"),
    ("data.num_shards", -2, "data.num_shards -2 must be a positive multiple of the process count 1"),
    ("mesh.logical_axis_rules", (("batch", "data"),), "mesh.logical_axis_rules: no rule for 'length'"),
])
def test_validate_names_the_bad_setting(pretrain_data, key, value, message):
    from llada_jax.config import train_config
    from llada_jax.errors import ConfigError
    from llada_jax.train.loop import validate

    c = train_config()
    c.output_dir, c.data_path, c.max_length = "unused", pretrain_data, 32
    validate(c)
    set_dotted(c, key, value)
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("settings,message", [
    ({"lora.rank": 8}, "lora.rank is set, but lora.enabled is false"),
    ({"lora.alpha": 8.0, "lora.targets": "q_proj"}, "lora.alpha, lora.targets are set, but lora.enabled is false"),
    ({"wandb.project": "mine"}, "wandb.project is set, but wandb.enabled is false"),
    ({"eval_batches": 2}, "eval_batches is set, but eval_data_path is empty"),
    ({"block_diffusion.mask_rate_max": 0.9}, "block_diffusion.mask_rate_max is set, but model.attention_type is "
                                             "'bidirectional'"),
    ({"data.too_long": "skip"}, "data.too_long is set, but task is 'pretrain'"),
    ({"task": "sft", "random_length_prob": 0.01}, "random_length_prob is set, but task is 'sft'"),
    ({"optimizer.decay_fraction": 0.2}, "optimizer.decay_fraction is set, but lr_scheduler_type is 'cosine'"),
    ({"lr_scheduler_type": "constant", "optimizer.min_lr_ratio": 0.5},
     "optimizer.min_lr_ratio is set, but lr_scheduler_type is 'constant'"),
    ({"data.tfds_data_dir": "/data/tfds"}, "data.tfds_data_dir is set, but neither data_path nor eval_data_path is"),
    ({"model.attention_type": "block_causal", "model.block_size": 8, "eps": 0.01},
     "eps is set, but model.attention_type is 'block_causal'"),
    ({"model.attention_type": "causal", "adaptation.mask_annealing_steps": 10},
     "adaptation.mask_annealing_steps applies to bidirectional models, not causal ones"),
])
def test_a_setting_that_would_not_apply_is_an_error(pretrain_data, settings, message):
    """An option of a feature that is off (LoRA, W&B, evaluation, block diffusion), of another task or of another
    schedule would be silently ignored: validate names it and what turns it on (issue 28)."""
    from llada_jax.config import train_config
    from llada_jax.errors import ConfigError
    from llada_jax.train.loop import validate

    c = train_config()
    c.output_dir, c.data_path, c.max_length = "unused", pretrain_data, 32
    for key, value in settings.items():
        set_dotted(c, key, value)
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_a_setting_named_on_the_command_line_or_in_a_config_file_counts_as_given(tmp_path, pretrain_data):
    """Given means: different from the default, or named by a --config override (even at its default value). A
    config file is the same as the command line; a file that holds every default (create-configs) gives nothing."""
    from llada_jax.cli import main
    from llada_jax.config import LLaDAConfig, load_config, train_config
    from llada_jax.errors import ConfigError
    from llada_jax.train.loop import validate

    c = train_config()
    c.output_dir, c.data_path, c.max_length = "unused", pretrain_data, 32
    validate(c)
    validate(c, overridden=("learning_rate", "lora.enabled"))
    on = c.copy_and_resolve_references()  # the same options, with what makes them apply
    on.wandb.enabled, on.wandb.project = True, "mine"
    on.eval_data_path, on.eval_batches = pretrain_data, 2
    on.lr_scheduler_type, on.optimizer.decay_fraction, on.optimizer.min_lr_ratio = "wsd", 0.2, 0.5
    on.model.update(attention_type="block_causal", block_size=8)
    on.block_diffusion.mask_rate_max = 0.9
    validate(on, overridden=("wandb.run_name", "eval_steps", "block_diffusion.mask_rate_min"))
    with pytest.raises(ConfigError, match="^lora.rank is set, but lora.enabled is false"):
        validate(c, overridden=("lora.rank",))  # --config.lora.rank=16: the default, but named
    path = tmp_path / "lora.json"
    body = {"output_dir": "unused", "data_path": pretrain_data, "max_length": 32, "model": LLaDAConfig.tiny().to_dict(),
            "lora": {"enabled": False, "rank": 8}}
    path.write_text(json.dumps({"pretraining": body}))
    with pytest.raises(ConfigError, match="^lora.rank is set, but lora.enabled is false"):
        validate(load_config(str(path), task="pretrain"))
    # the architecture of a model started from is its own: a model.* shape or id on the command line is an error
    from flax import nnx

    from llada_jax import LLaDAForMaskedLM

    c.model_name_or_path = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0)).save_pretrained(str(tmp_path / "hf"))
    validate(c, overridden=("model.dtype", "model.shift_logits"))  # compute settings and adaptable fields apply
    with pytest.raises(ConfigError, match="^model.eos_token_id is set, but the architecture is the one of "
                                          "model_name_or_path .*config.json"):
        validate(c, overridden=("model.eos_token_id",))
    c.model_name_or_path = ""
    assert main(["create-configs", "--output_dir", str(tmp_path / "defaults")]) == 0
    for name, task in (("pretraining_config.json", "pretrain"), ("sft_config.json", "sft")):
        full = load_config(str(tmp_path / "defaults" / name), task=task)
        full.model.update(train_config().model.to_dict())  # the tiny model, to keep validate cheap
        full.output_dir, full.data_path, full.max_length = "unused", pretrain_data, 32
        full.model_name_or_path = ""
        validate(full)


def test_missing_data_and_unknown_flag(tmp_path):
    proc = cli("pretrain", "--config", TINY, "--data_path", str(tmp_path / "none.jsonl"), "--output_dir",
               str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = cli("pretrain", "--config", TINY, "--data-path", "x", check=False)
    assert proc.returncode == 2 and "unrecognized argument '--data-path'" in proc.stderr


def test_pretrain_text_then_sft_chat_from_orbax_and_from_hf(tmp_path):
    from llada_jax.data.bpe import build_bpe_tokenizer

    sentences = [f"The {a} cat sat on the {b} mat number {i}." for i, (a, b) in
                 enumerate([("black", "red"), ("white", "blue"), ("small", "green")] * 20)]
    tok = str(tmp_path / "tok")
    build_bpe_tokenizer(sentences, tok, vocab_size=512)  # the tiny preset's ids: BOS 509, EOS 510, mask 511
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Where is cat {i}?"},
                                                      {"role": "assistant", "content": f"On mat {i}."}]}) + "\n"
                             for i in range(40)))
    base = str(tmp_path / "base")
    cli("pretrain", "--config", TINY, "--data_path", str(text), "--output_dir", base, "--max_steps", "4",
        "--max_length", "32", "--config.data.tokenizer=" + tok)
    assert os.path.exists(os.path.join(base, "tokenizer", "tokenizer.json"))
    sft_config = os.path.join(os.path.dirname(TINY), "tiny_sft.py")

    def sft(init, out):
        cli("sft", "--config", sft_config, "--model_name_or_path", init, "--data_path", str(chats),
            "--output_dir", out, "--max_steps", "3", "--max_length", "48", "--logging_steps", "1")
        return read_metrics(out)

    from_orbax = sft(base, str(tmp_path / "sft_orbax"))
    assert len(from_orbax) == 3 and all(np.isfinite(m["loss"]) and m["masked_tokens"] > 0 for m in from_orbax)
    assert os.path.exists(os.path.join(tmp_path, "sft_orbax", "tokenizer", "tokenizer.json"))  # carried over
    hf = str(tmp_path / "hf")
    cli("convert", "to-hf", "--input", base, "--output", hf)
    from_hf = sft(hf, str(tmp_path / "sft_hf"))
    # the HF export holds the same parameters: the same first step, bit for bit
    assert from_hf[0]["loss"] == from_orbax[0]["loss"]


def test_bad_training_data_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5, "six"]}\n')
    proc = cli("pretrain", "--config", TINY, "--data_path", str(bad), "--output_dir", str(tmp_path / "o"),
               "--max_steps", "3", "--max_length", "8", "--batch_size", "8", check=False)
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("llada-jax pretrain: error: ") and f"{bad}, line 2: field 'input_ids'" in error
