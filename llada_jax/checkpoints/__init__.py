"""The checkpoint I/O layer: every file a model or a run is saved in, read and written in one place.

Its modules, in their layers (`.importlinter`: each imports only the rows below it, those of one row do not
import each other; function-local imports count):

    cli            `llada-jax convert to-hf [--adapter_only] | from-hf [--adapter]`
    hf_export      a model or an Orbax checkpoint -> Hugging Face directory (with hf_files/, the PyTorch code);
                   a LoRA checkpoint exported merged
    peft_adapter   LoRA checkpoints <-> PEFT LoRA adapter directories
    loading        load_model_and_tokenizer / load_pretrained / read_model_config for every format: a Hugging
                   Face directory, an Orbax model, a LoRA checkpoint (its base loaded, then the adapters applied)
    adapters | hf_import
                   LoRA checkpoints: adapters only, naming their base model (read, write, apply to a loaded base)
                   | Hugging Face directory -> a model in memory or an Orbax checkpoint
    orbax_model | ar_import | hf_config | hf_moe_config | safetensors_io | hf_keys
                   whole models in Orbax checkpoints: save, sharded restore, one parameter at a time
                   | autoregressive LLaMA / Mistral / Qwen2 directories: config, mask token, tokenizer
                   | config.json of the official layout <-> LLaDAConfig
                   | config.json of LLaDA 2.x and LLaDA-MoE <-> LLaDAConfig
                   | (sharded) safetensors read and written one tensor at a time
                   | the key tables between our parameters and the Hugging Face state dicts (LLaDA, LLaMA-style
                   AR, LLaDA 2.x per-expert and merged, LLaDA-MoE)
    atomic | layout
                   files and directories written under a temporary name and renamed when complete
                   | the run-directory layout: names, finished steps, Orbax run vs Hugging Face directory, LoRA
                   steps, the tokenizer's place
    storage        local paths and URLs (gs://...): one set of file operations for both

Training, data, sampling and evaluation build on this layer; it builds only on the model and the config.
Importing the package is cheap: the names below load their module on first use.
"""

import importlib

_EXPORTS = {
    "load_model_and_tokenizer": "loading", "load_pretrained": "loading", "read_model_config": "loading",
    "load_on_mesh": "loading", "model_tokenizer": "loading",
    "save_pretrained": "hf_export", "convert_to_hf": "hf_export", "convert_from_hf": "hf_import",
    "load_model": "orbax_model", "save_model": "orbax_model",
    "export_peft_adapter": "peft_adapter", "import_peft_adapter": "peft_adapter",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llada_jax.checkpoints.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llada_jax.checkpoints' has no attribute {name!r}")
