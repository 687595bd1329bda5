"""compile-check: the train step, and the sampler, compiled ahead of time for N fake devices."""

import json
import os

from tests.runs import ROOT, cli


def test_compile_check_sizes_the_8b_model_on_8_devices(tmp_path):
    report = tmp_path / "report.json"
    proc = cli("compile-check", "--config", os.path.join(ROOT, "configs", "llada_8b_pretrain.py"),
               "--num_devices", "8", "--json", str(report), devices=1)
    r = json.loads(report.read_text())
    assert r["devices"] == 8 and r["parameters"] == 8_015_581_184
    assert r["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    # fp32 params + two Adam moments, sharded 8 ways: 12 bytes x 8.0e9 / 8 = 12.0 GB per device
    assert abs(r["argument_bytes"] - 12 * 8_015_581_184 / 8) / r["argument_bytes"] < 0.02
    assert r["temp_bytes"] > 0 and "per-device memory" in proc.stdout


def test_compile_check_sizes_llada2_mini_on_an_expert_mesh(tmp_path):
    """LLaDA2.0-mini on 16 devices, fsdp=4 x expert=4: the routed experts (19 MoE layers x 256 x 3 x 2048 x 512) are
    split 16 ways, the rest of the model over fsdp alone (12 bytes a parameter: fp32 masters and two AdamW moments);
    the FLOPs count the active parameters."""
    from llada_jax.config import LLaDAConfig
    from llada_jax.train.step import flops_per_token

    report = tmp_path / "report.json"
    proc = cli("compile-check", "--config", os.path.join(ROOT, "configs", "moe_pretrain.py"), "--num_devices", "16",
               "--config.mesh.fsdp=4", "--config.mesh.expert=4", "--config.max_length=64", "--config.batch_size=16",
               "--config.gradient_accumulation_steps=1", "--json", str(report), devices=1)
    r = json.loads(report.read_text())
    assert r["parameters"] == 16_255_643_392 and r["mesh"] == {"data": 1, "fsdp": 4, "expert": 4, "tensor": 1}
    experts = 19 * 256 * 3 * 2048 * 512
    want = 12 * (experts / 16 + (r["parameters"] - experts) / 4)
    assert abs(r["argument_bytes"] - want) / want < 0.02 and "per-device memory" in proc.stdout
    assert r["model_flops_per_step"] == flops_per_token(LLaDAConfig.llada2_mini(), 64) * 16 * 64


def test_compile_check_sizes_the_8b_sampler_on_8_devices(tmp_path):
    """LLaDA-8B in bf16 with tensor=8: each device holds an eighth of the 16 GB of weights, and the whole sampler
    (prompt 512, 256 generated, batch 8) fits a 16 GB chip; with every device on data it does not."""
    common = ["compile-check", "--sample", "--num_devices", "8", "--model", "llada_8b", "--dtype", "bfloat16",
              "--batch_size", "8", "--prompt_length", "512", "--gen_length", "256", "--block_length", "32",
              "--steps", "256"]
    reports = {}
    for mesh in ("tensor=8", "data=8"):
        out = tmp_path / f"{mesh}.json"
        proc = cli(*common, "--mesh", mesh, "--json", str(out), devices=1)
        assert "per-device memory" in proc.stdout
        reports[mesh] = json.loads(out.read_text())
    tp = reports["tensor=8"]
    assert tp["parameters"] == 8_015_581_184 and tp["mesh"] == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 8}
    assert abs(tp["argument_bytes"] - 2 * 8_015_581_184 / 8) / tp["argument_bytes"] < 0.02  # bf16 / 8
    assert tp["peak_bytes_estimate"] < 16 * 1024**3
    # no float32 copy of the weights held across the loops (the CPU compiler's bf16 matmul artefact, removed)
    assert tp["temp_bytes"] < 0.5 * tp["argument_bytes"]
    replicated = reports["data=8"]
    assert abs(replicated["argument_bytes"] - 2 * 8_015_581_184) / replicated["argument_bytes"] < 0.02
    assert replicated["peak_bytes_estimate"] > 16 * 1024**3
    assert replicated["temp_bytes"] < 0.1 * replicated["argument_bytes"]


def _tiny_sft_report(devices, **overrides):
    import jax

    from llada_jax.config import apply_overrides, load_config, model_config_from
    from llada_jax.train import aot
    from llada_jax.train.loop import make_run_mesh

    config = load_config(os.path.join(ROOT, "configs", "tiny_sft.py"))
    apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    model_config = model_config_from(config)
    return aot.compile_train_step(config, model_config, make_run_mesh(config, model_config, jax.devices()[:devices]))


def test_compile_check_of_lora_reports_the_adapters_as_trained_and_the_base_as_a_frozen_argument():
    """The tiny model with rank-4 adapters on every projection, one device: the trained parameters are the
    adapters' rank * (in + out) per target per layer, the frozen ones the base model's, and the arguments hold
    the base once (its dtype) instead of three float32 copies (masters + two AdamW moments)."""
    from llada_jax.config import LLaDAConfig
    from llada_jax.model import count_params

    cfg, rank = LLaDAConfig.tiny(), 4
    d, attn, mlp = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.mlp_hidden_size
    kv = cfg.effective_n_kv_heads * cfg.head_dim
    per_layer = rank * ((d + attn) + 2 * (d + kv) + (attn + d) + 2 * (d + mlp) + (mlp + d))
    adapters = cfg.n_layers * per_layer
    base = count_params(cfg)

    full = _tiny_sft_report(1)
    lora = _tiny_sft_report(1, **{"lora.enabled": "true", "lora.rank": rank})
    lora_bf16 = _tiny_sft_report(1, **{"lora.enabled": "true", "lora.rank": rank, "model.param_dtype": "bfloat16"})

    assert not full["lora"] and full["trained_parameters"] == full["parameters"] == base
    assert full["frozen_parameters"] == 0
    for r, itemsize in ((lora, 4), (lora_bf16, 2)):
        assert r["lora"] and r["trained_parameters"] == adapters and r["frozen_parameters"] == base
        assert r["parameters"] == base + adapters
        assert r["trained_parameter_bytes"] == 4 * adapters and r["frozen_parameter_bytes"] == itemsize * base
        # full: 12 bytes per base parameter (fp32 master + mu + nu); LoRA: the base once, plus 12 per adapter
        # parameter; the batch and the scalars are the same in both
        saved = full["argument_bytes"] - r["argument_bytes"]
        expected = (12 - itemsize) * base - 12 * adapters
        assert abs(saved - expected) <= 1024, (saved, expected)
        assert 0 < r["output_bytes"] < full["output_bytes"]  # the updated state: adapters and their moments only
    from llada_jax.train.aot import format_report

    assert "LoRA: trained" in format_report(lora) and "LoRA" not in format_report(full)


def test_compile_check_of_a_lora_config_needs_no_base_model(tmp_path):
    """compile-check of a LoRA config runs without model_name_or_path (it reads no weights) and prints the split."""
    report = tmp_path / "report.json"
    proc = cli("compile-check", "--config", os.path.join(ROOT, "configs", "tiny_sft.py"), "--num_devices", "2",
               "--config.lora.enabled=true", "--config.model.param_dtype=bfloat16", "--json", str(report), devices=1)
    r = json.loads(report.read_text())
    assert r["lora"] and r["frozen_parameters"] + r["trained_parameters"] == r["parameters"]
    assert "LoRA: trained" in proc.stdout and r["mesh"] == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 1}
