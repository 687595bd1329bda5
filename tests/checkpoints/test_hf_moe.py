"""Hugging Face directories of the Mixture-of-Experts families both ways: LLaDA 2.x (per-expert keys and dFactory's
merged experts) and LLaDA-MoE are read and give the independent PyTorch reference's logits; the export is the
LLaDA 2.x layout that the exported PyTorch code (and the published one) loads, with the same logits; config
fields this project does not implement are one clear error."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import LLaDAForMaskedLM
from llada_jax.cli import main
from llada_jax.errors import HFConfigError
from tests import moe_reference as ref
from tests.checkpoints.hf_helpers import read_all

IDS = np.random.RandomState(0).randint(0, 96, (2, 12))


@pytest.fixture(scope="module")
def llada2_dir(tmp_path_factory):
    cfg = ref.tiny_llada2_config()
    weights = ref.random_weights(cfg, seed=1)
    path = str(tmp_path_factory.mktemp("llada2") / "hf")
    ref.write_hf_dir(path, cfg, weights, shards=3)
    return path, cfg, weights


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("layout", ["per_expert", "merged"])
def test_llada2_directory_gives_the_reference_logits(llada2_dir, tmp_path, layout):
    path, cfg, weights = llada2_dir
    if layout == "merged":
        path = str(tmp_path / "merged")
        ref.write_hf_dir(path, cfg, ref.random_weights(cfg, seed=1, layout="merged"))
        assert json.load(open(os.path.join(path, "config.json")))["model_type"] == "llada2_moe_veomni"
    model = LLaDAForMaskedLM.from_pretrained(path, attention_type="block_causal", block_size=4)
    c = model.config
    assert (c.num_experts, c.first_dense_layers, c.router_groups, c.rotary_dim, c.mask_token_id) == (8, 1, 4, 4, 93)
    mask = np.ones_like(IDS)
    mask[1, :2] = 0
    want = ref.llada2_logits(weights, cfg, IDS, mask, visible=ref.block_causal_visible(12, 4))
    got = np.asarray(model(jnp.asarray(IDS), jnp.asarray(mask)))
    close(got[mask.astype(bool)], want[mask.astype(bool)])


def test_llada2_reads_as_block_diffusion_in_blocks_of_32(llada2_dir):
    model = LLaDAForMaskedLM.from_pretrained(llada2_dir[0])
    assert (model.config.attention_type, model.config.block_size) == ("block_causal", 32)


def test_llada_moe_directory_gives_the_reference_logits(tmp_path):
    cfg = ref.tiny_llada_moe_config()
    weights = ref.random_weights(cfg, seed=2)
    ref.write_hf_dir(str(tmp_path), cfg, weights)
    model = LLaDAForMaskedLM.from_pretrained(str(tmp_path))
    assert (model.config.router_score, model.config.attention_type, model.config.n_moe_layers) == ("softmax",
                                                                                                 "bidirectional", 2)
    close(np.asarray(model(jnp.asarray(IDS))), ref.llada_moe_logits(weights, cfg, IDS))


def test_export_is_the_llada2_layout_and_pytorch_loads_it(llada2_dir, tmp_path):
    """convert from-hf then to-hf: the same tensors under the same keys, a config.json the published code reads,
    and this project's PyTorch code giving the JAX model's logits (block-causal masks passed as [B, 1, L, L])."""
    import torch
    import transformers

    path, cfg, weights = llada2_dir
    orbax, out = str(tmp_path / "orbax"), str(tmp_path / "hf")
    assert main(["convert", "from-hf", "--input", path, "--output", orbax]) == 0
    assert main(["convert", "to-hf", "--input", orbax, "--output", out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "configuration_llada2_moe.py", "model.safetensors",
                                       "modeling_llada2_moe.py"]
    exported = read_all(out)
    assert sorted(exported) == sorted(weights)
    for key, value in weights.items():
        assert exported[key].tobytes() == value.astype(np.float32).tobytes(), key
    written = json.load(open(os.path.join(out, "config.json")))
    for field in ("hidden_size", "num_experts", "n_group", "topk_group", "routed_scaling_factor", "rotary_dim",
                  "first_k_dense_replace", "score_function", "moe_router_enable_expert_bias", "num_shared_experts"):
        assert written[field] == cfg[field], field
    assert written["model_type"] == "llada2_moe" and written["auto_map"]["AutoModelForCausalLM"].startswith(
        "modeling_llada2_moe.")

    model = LLaDAForMaskedLM.from_pretrained(out, attention_type="block_causal", block_size=4)
    visible = ref.block_causal_visible(12, 4)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        mask = torch.from_numpy(np.broadcast_to(visible, (2, 1, 12, 12)).copy())
        torch_out = torch_model(torch.from_numpy(IDS), attention_mask=mask).logits.numpy()
    close(torch_out, np.asarray(model(jnp.asarray(IDS))))


@pytest.mark.parametrize("field, value, named", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("score_function", "noaux_tc", "score_function"),
    ("use_bias", True, "use_bias"),
    ("num_experts", 6, "router_groups"),  # 4 groups do not divide 6 experts
])
def test_unsupported_config_fields_are_one_clear_error_and_nothing_is_written(tmp_path, capsys, field, value, named):
    cfg = ref.tiny_llada2_config()
    weights = ref.random_weights(cfg, seed=3)
    cfg[field] = value
    path, out = str(tmp_path / "hf"), str(tmp_path / "out")
    ref.write_hf_dir(path, cfg, weights)
    with pytest.raises(HFConfigError, match=named):
        LLaDAForMaskedLM.from_pretrained(path)
    assert main(["convert", "from-hf", "--input", path, "--output", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and named in err[0], err
    assert not os.path.exists(out)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_on_a_moe_model_exports_merged_and_as_a_peft_adapter(tmp_path, scan_layers):
    """Adapters on the attention (q / k / v into the fused query_key_value), the dense first layer's MLP and the
    shared experts: the merged export and the PEFT adapter on the exported base both give the JAX LoRA model's
    logits in PyTorch."""
    import torch
    import transformers
    from flax import nnx

    from llada_jax.config import LLaDAConfig, LoRAConfig
    from llada_jax.lora import present_targets
    from tests.checkpoints.test_lora_export import make_lora_run

    peft = pytest.importorskip("peft")
    config = LLaDAConfig.tiny_moe(vocab_size=96, mask_token_id=93, eos_token_id=94, pad_token_id=94,
                                  bos_token_id=None, scan_layers=scan_layers)
    targets = ("q_proj", "v_proj", "attn_out", "ff_proj", "ff_out", "shared_gate", "shared_down")
    _, lora_model, _, run, base_hf = make_lora_run(tmp_path, config, targets)
    assert present_targets(config, LoRAConfig(targets=targets)) == targets
    ids = IDS % 90
    want = np.asarray(lora_model(jnp.asarray(ids)))
    trained = nnx.state(lora_model, nnx.LoRAParam)
    assert "shared_gate" in str(jax_paths(trained)) and "ff_proj" in str(jax_paths(trained))

    merged = str(tmp_path / "merged")
    assert main(["convert", "to-hf", "--input", run, "--output", merged]) == 0
    load = dict(trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(merged, **load)(torch.from_numpy(ids)).logits
    close(got.numpy(), want)

    adapter = str(tmp_path / "peft")
    assert main(["convert", "to-hf", "--adapter_only", "--input", run, "--output", adapter]) == 0
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["rank_pattern"] == {"query_key_value": 8} and cfg["alpha_pattern"] == {"query_key_value": 16}
    base = transformers.AutoModelForCausalLM.from_pretrained(base_hf, **load)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    adapted = {name.split(".", 5)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"attention.query_key_value", "attention.dense", "mlp.gate_proj", "mlp.down_proj",
                       "mlp.shared_experts.gate_proj", "mlp.shared_experts.down_proj"}, adapted
    with torch.no_grad():
        close(model(torch.from_numpy(ids)).logits.numpy(), want)


def jax_paths(state):
    from flax import nnx

    return [path for path, _ in nnx.to_flat_state(state)]


def test_token_ids_come_from_the_generation_config_and_the_tokenizer(tmp_path):
    """The published LLaDA 2.x config.json names pad only: the mask id is the tokenizer's <|mask|>, EOS the
    generation config's; without either (and not the published vocabulary) it is an error naming the field."""
    cfg = ref.tiny_llada2_config()
    weights = ref.random_weights(cfg, seed=4)
    for name in ("mask_token_id", "eos_token_id"):
        del cfg[name]
    ref.write_hf_dir(str(tmp_path), cfg, weights)
    with pytest.raises(HFConfigError, match="no mask_token_id"):
        LLaDAForMaskedLM.from_pretrained(str(tmp_path))
    json.dump({"added_tokens": [{"id": 90, "content": "<|mask|>"}, {"id": 91, "content": "<|endoftext|>"}]},
              open(tmp_path / "tokenizer.json", "w"))
    json.dump({"eos_token_id": 92}, open(tmp_path / "generation_config.json", "w"))
    c = LLaDAForMaskedLM.from_pretrained(str(tmp_path)).config
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id) == (90, 92, 95)
