"""LoRA checkpoints exported to Hugging Face: merged (`convert to-hf`), as a PEFT adapter directory
(`convert to-hf --adapter_only`, applied with peft.PeftModel), and imported back (`convert from-hf --adapter`)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.checkpoints import load_pretrained
from llada_jax.checkpoints.adapters import adapter_target, per_layer, read_lora_step, save_adapters, with_adapters
from llada_jax.checkpoints.orbax_model import save_model
from llada_jax.checkpoints.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, weight_key
from llada_jax.cli import main
from llada_jax.config import LORA_TARGETS, LoRAConfig
from llada_jax.lora import SHARED_EXPERT_TARGETS

DENSE_TARGETS = tuple(t for t in LORA_TARGETS if t not in SHARED_EXPERT_TARGETS)  # every projection a dense model has
from llada_jax.lora import target_layout
from tests.checkpoints.hf_helpers import (
    IDS,
    assert_nothing_written,
    hf_automodel,
    run_cli,
    torch_logits,
)

peft = pytest.importorskip("peft")

SETUPS = {
    # every target, scanned layers, grouped-query attention, an untied output head
    "scanned_all": dict(config=dict(n_kv_heads=2), targets=DENSE_TARGETS),
    # a subset (ff_out included: the head, also named ff_out, must stay unadapted), unrolled layers
    "unrolled_subset": dict(config=dict(n_kv_heads=2, scan_layers=False), targets=("q_proj", "v_proj", "ff_out")),
}


def random_adapters(config, lora, seed, scale=0.1):
    """Adapters (pure dict, float32) with random A and B (B starts at zero in training: no-op adapters would
    let a dropped adapter pass)."""
    state = adapter_target(config, lora)  # ShapeDtypeStructs
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float32) * scale
                                        for k, x in zip(keys, leaves)])


def make_lora_run(root, config, targets, *, rank=4, alpha=8.0, seed=0):
    """(base model, unmerged JAX LoRA model, base Orbax dir, LoRA run dir, base HF export)."""
    base_model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(seed))
    base_dir = save_model(base_model, str(root / "base"))
    lora = LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, targets=targets)
    adapters = random_adapters(config, lora, seed + 1)
    lora_model = with_adapters(base_model, lora, adapters)
    run = save_adapters(str(root / "lora"), adapters, config, lora, base_dir)
    base_hf = str(root / "base_hf")
    assert main(["convert", "to-hf", "--input", base_dir, "--output", base_hf]) == 0
    return base_model, lora_model, base_dir, run, base_hf


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(request, tmp_path_factory):
    spec = SETUPS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    config = LLaDAConfig.tiny(**spec["config"])
    base_model, lora_model, base_dir, run, base_hf = make_lora_run(root, config, spec["targets"])
    return dict(name=request.param, root=root, config=config, targets=spec["targets"], base_model=base_model,
                lora_model=lora_model, base=base_dir, run=run, base_hf=base_hf,
                jax_logits=np.asarray(lora_model(jnp.asarray(IDS))),
                base_logits=np.asarray(base_model(jnp.asarray(IDS))))


def test_merged_export_gives_the_unmerged_logits(setup):
    out = str(setup["root"] / "merged_hf")
    assert main(["convert", "to-hf", "--input", setup["run"], "--output", out]) == 0
    hf = hf_automodel(out, dtype=torch.float32)
    got = torch_logits(hf, IDS)
    diff = np.abs(got - setup["jax_logits"]).max()
    print(f"{setup['name']}: merged export vs unmerged JAX LoRA logits, max abs diff {diff:.2e}")
    np.testing.assert_allclose(got, setup["jax_logits"], rtol=1e-4, atol=1e-4)
    assert np.abs(got - setup["base_logits"]).max() > 1e-2  # the adapters do change the logits
    # the export equals the JAX merged model, and keeps the base's config.json
    merged = load_pretrained(setup["run"], merge_lora=True)
    np.testing.assert_allclose(got, np.asarray(merged(jnp.asarray(IDS))), rtol=1e-4, atol=1e-4)
    assert json.load(open(os.path.join(out, "config.json")))["d_model"] == setup["config"].d_model


def test_peft_adapter_applies_to_the_exported_base(setup):
    out = str(setup["root"] / "peft")
    assert main(["convert", "to-hf", "--adapter_only", "--input", setup["run"], "--output", out]) == 0
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
    assert {k: cfg[k] for k in ("peft_type", "r", "lora_alpha", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
                                "modules_to_save", "task_type", "inference_mode")} == dict(
        peft_type="LORA", r=4, lora_alpha=8, bias="none", use_dora=False, use_rslora=False, fan_in_fan_out=False,
        modules_to_save=None, task_type=None, inference_mode=True)
    assert cfg["base_model_name_or_path"] is None  # an Orbax base: PEFT takes the exported one, as below

    base = hf_automodel(setup["base_hf"], dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(base, IDS), setup["base_logits"], rtol=1e-4, atol=1e-4)
    model = peft.PeftModel.from_pretrained(base, out)
    model.eval()
    adapted = sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))
    n_layers = setup["config"].n_layers
    assert adapted == sorted(f"base_model.model.model.transformer.blocks.{i}.{t}"
                             for i in range(n_layers) for t in setup["targets"])  # the head is not adapted
    with torch.no_grad():
        got = model(torch.from_numpy(IDS)).logits.float().numpy()
    diff = np.abs(got - setup["jax_logits"]).max()
    print(f"{setup['name']}: PEFT on the exported base vs JAX LoRA logits, max abs diff {diff:.2e}")
    np.testing.assert_allclose(got, setup["jax_logits"], rtol=1e-4, atol=1e-4)
    assert np.abs(got - setup["base_logits"]).max() > 1e-2


def test_adapter_import_round_trip(setup):
    out = str(setup["root"] / "peft_rt")
    assert main(["convert", "to-hf", "--adapter_only", "--input", setup["run"], "--output", out]) == 0
    back = str(setup["root"] / "imported")  # on the Orbax base
    assert main(["convert", "from-hf", "--adapter", out, "--input", setup["base"], "--output", back]) == 0
    *_, lora, base, _, adapters = read_lora_step(setup["run"])
    *_, lora2, base2, _, adapters2 = read_lora_step(back)
    assert (lora2, base2) == (lora, base)
    config = setup["config"]
    for t, pairs in per_layer(adapters, lora, config).items():
        for (a, b), (a2, b2) in zip(pairs, per_layer(adapters2, lora2, config)[t]):
            assert a.tobytes() == a2.tobytes() and b.tobytes() == b2.tobytes()
    np.testing.assert_array_equal(np.asarray(load_pretrained(back)(jnp.asarray(IDS))),
                                  np.asarray(load_pretrained(setup["run"])(jnp.asarray(IDS))))

    # on the Hugging Face export of the base (--input): the same model
    on_hf = str(setup["root"] / "imported_hf")
    assert main(["convert", "from-hf", "--adapter", out, "--input", setup["base_hf"], "--output", on_hf]) == 0
    np.testing.assert_allclose(np.asarray(load_pretrained(on_hf)(jnp.asarray(IDS))), setup["jax_logits"],
                               rtol=1e-5, atol=1e-5)
    # exported again, its adapter names the Hugging Face base, and imports onto it without --input
    again = str(setup["root"] / "peft_again")
    assert main(["convert", "to-hf", "--adapter_only", "--input", on_hf, "--output", again]) == 0
    assert json.load(open(os.path.join(again, ADAPTER_CONFIG)))["base_model_name_or_path"] == setup["base_hf"]
    assert main(["convert", "from-hf", "--adapter", again, "--output", str(setup["root"] / "again_run")]) == 0
    # its merged export streams the Hugging Face base
    merged = str(setup["root"] / "imported_hf_merged")
    assert main(["convert", "to-hf", "--input", on_hf, "--output", merged]) == 0
    np.testing.assert_allclose(np.asarray(load_pretrained(merged)(jnp.asarray(IDS))), setup["jax_logits"],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setup", ["scanned_all"], indirect=True)
def test_merged_export_of_adapters_on_a_lora_base(setup, tmp_path):
    """A LoRA run whose base is itself a LoRA run: exported as both merged."""
    config = setup["config"]
    lora = LoRAConfig(rank=2, alpha=4.0, dropout=0.0, targets=("k_proj", "attn_out"))
    adapters = random_adapters(config, lora, seed=7)
    run = save_adapters(str(tmp_path / "second"), adapters, config, lora, setup["run"])
    want = np.asarray(with_adapters(setup["lora_model"].merge_lora(), lora, adapters)(jnp.asarray(IDS)))
    out = str(tmp_path / "hf")
    assert main(["convert", "to-hf", "--input", run, "--output", out]) == 0
    got = torch_logits(hf_automodel(out, dtype=torch.float32), IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - setup["jax_logits"]).max() > 1e-2


def edited_adapter(setup, name, **changes):
    src = str(setup["root"] / "peft")
    if not os.path.isdir(src):
        assert main(["convert", "to-hf", "--adapter_only", "--input", setup["run"], "--output", src]) == 0
    dst = str(setup["root"] / name)
    os.makedirs(dst)
    os.link(os.path.join(src, ADAPTER_WEIGHTS), os.path.join(dst, ADAPTER_WEIGHTS))
    cfg = json.load(open(os.path.join(src, ADAPTER_CONFIG)))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, ADAPTER_CONFIG), "w"))
    return dst


@pytest.mark.parametrize("setup", ["scanned_all"], indirect=True)
@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "use_dora=true is not supported"),
    (dict(use_rslora=True), "use_rslora=true is not supported"),
    (dict(bias="all"), "bias='all' is not supported"),
    (dict(modules_to_save=["ff_out"]), "modules_to_save"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(target_modules=["q_proj", "lm_head"]), "target_modules names 'lm_head'"),
    (dict(target_modules=r".*\.ff_out"), "also matches model.transformer.ff_out (the output head)"),
    (dict(target_modules=r"model\.transformer\.blocks\.0\.q_proj"), "adapting a subset of the layers"),
])
def test_unsupported_peft_settings_are_errors(setup, tmp_path, capsys, changes, message):
    bad = edited_adapter(setup, f"bad_{len(os.listdir(setup['root']))}", **changes)
    out = str(tmp_path / "out")
    assert main(["convert", "from-hf", "--adapter", bad, "--input", setup["base"], "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and ADAPTER_CONFIG in err, err
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("setup", ["scanned_all"], indirect=True)
def test_orbax_load_model_of_a_lora_step_names_load_pretrained(setup):
    """`orbax_model.load_model` restores whole models; a LoRA step (adapters only) is loaded with its base by
    `load_pretrained`, and load_model says so instead of restoring the adapters as a model."""
    from llada_jax.checkpoints.orbax_model import load_model
    from llada_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="a LoRA checkpoint .*load it with load_pretrained"):
        load_model(setup["run"])


@pytest.mark.parametrize("setup", ["scanned_all"], indirect=True)
def test_a_base_of_another_shape_is_an_error(setup, tmp_path):
    adapter = str(setup["root"] / "peft_rt")
    if not os.path.isdir(adapter):
        assert main(["convert", "to-hf", "--adapter_only", "--input", setup["run"], "--output", adapter]) == 0
    other = save_model(LLaDAForMaskedLM(LLaDAConfig.tiny(n_kv_heads=2, d_model=32), rngs=nnx.Rngs(0)),
                       str(tmp_path / "other"))
    out = str(tmp_path / "out")
    r = run_cli("convert", "from-hf", "--adapter", adapter, "--input", other, "--output", out)  # the real command
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    key = weight_key(0, "q_proj", "A")
    assert f"{key} has shape [4, 64]" in err and "need [4, 32]" in err and "d_model=32" in err, err
    assert err.count("\n") == 0 and "Traceback" not in err
    assert_nothing_written(tmp_path, out)

    # --adapter_only of a whole model, --dtype with --adapter: usage errors, nothing written
    assert main(["convert", "to-hf", "--adapter_only", "--input", other, "--output", out]) == 2
    assert main(["convert", "from-hf", "--adapter", adapter, "--dtype", "bfloat16", "--output", out]) == 2
    assert not os.path.exists(out)


@pytest.mark.parametrize("setup", ["scanned_all"], indirect=True)
def test_an_adapter_written_by_peft_imports(setup, tmp_path, capsys):
    """An adapter PEFT itself trained (random A and B) and saved on the exported base: imported, our model
    gives PEFT's logits. A list target_modules with "ff_out" makes PEFT adapt the output head too: an error."""
    written = str(tmp_path / "by_peft")
    model = peft.get_peft_model(hf_automodel(setup["base_hf"], dtype=torch.float32), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["k_proj", "up_proj"], init_lora_weights=False))
    model.save_pretrained(written)
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(IDS)).logits.float().numpy()
    assert np.abs(want - setup["base_logits"]).max() > 1e-2
    run = str(tmp_path / "run")
    assert main(["convert", "from-hf", "--adapter", written, "--input", setup["base"], "--output", run]) == 0
    np.testing.assert_allclose(np.asarray(load_pretrained(run)(jnp.asarray(IDS))), want, rtol=1e-4, atol=1e-4)

    head = str(tmp_path / "head")
    peft.get_peft_model(hf_automodel(setup["base_hf"], dtype=torch.float32), peft.LoraConfig(
        r=2, target_modules=["q_proj", "ff_out"])).save_pretrained(head)
    capsys.readouterr()
    assert main(["convert", "from-hf", "--adapter", head, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unexpected tensor(s) base_model.model.model.transformer.ff_out.lora_A.weight" in err, err
    assert_nothing_written(tmp_path, str(tmp_path / "out"))


def test_adapter_directory_is_a_small_fraction_of_the_base(tmp_path):
    # d_model 256, 4 layers, vocab 1024, rank 8 on every target
    config = LLaDAConfig.tiny(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768,
                              vocab_size=1024, mask_token_id=1023, eos_token_id=1022, pad_token_id=1022,
                              bos_token_id=1021)
    _, _, _, run, base_hf = make_lora_run(tmp_path, config, DENSE_TARGETS, rank=8)
    out = str(tmp_path / "peft")
    assert main(["convert", "to-hf", "--adapter_only", "--input", run, "--output", out]) == 0

    def size(d, ext=".safetensors"):
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(ext))

    adapter_params = config.n_layers * sum(
        8 * (math.prod(target_layout(config, t)[0]) + math.prod(target_layout(config, t)[2])) for t in DENSE_TARGETS)
    base_params = sum(v.size for v in jax.tree.leaves(nnx.state(LLaDAForMaskedLM(config, rngs=nnx.Rngs(0)))))
    assert adapter_params == 163_840 and base_params == 3_934_464
    ratio = size(out) / size(base_hf)  # both float32
    print(f"adapter / base safetensors bytes: {size(out)} / {size(base_hf)} = {ratio:.4f} "
          f"(parameters {adapter_params} / {base_params} = {adapter_params / base_params:.4f})")
    # the parameter ratio (4.16 %) plus the adapter file's header (one entry per tensor)
    assert ratio < adapter_params / base_params + 8 * 1024 / size(base_hf)
    assert ratio < 0.05
