"""basic: BASIC-style contrastive image-text training in JAX/Flax."""
import setuptools

# Versions pinned together: resolved and tested on Python 3.11 (CPU). On TPU VMs install
# `jax[tpu]==0.10.2` on top (see README); on GPU `jax[cuda12]==0.10.2`.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    # tensorflow-text 2.21 depends on the full `tensorflow` wheel, so that is what we ask for;
    # TensorFlow is used for the input pipeline only and is kept off accelerators.
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "ml_collections==1.1.0",
    "clu==0.0.12",
    "sentencepiece==0.2.3",
    "tensorboard==2.21.0",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "etils==1.15.0",
    # gs:// paths: etils.epath reads and writes them through fsspec/gcsfs (or tf.io.gfile when
    # EPATH_USE_TF is left on); orbax writes arrays through tensorstore's own GCS driver.
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
    "psutil==7.2.2",
    # tokenizer.kind='clip_bpe' (basic/clip_bpe.py): OpenAI CLIP's text cleaning and regex.
    "ftfy==6.3.1",
    "regex==2026.11.15",
]

# `pip install '.[convert]'`: basic.convert.open_clip (reads OpenCLIP / OpenAI CLIP weights),
# basic.export.open_clip / basic.export.hf and their tests. torchvision is open_clip_torch's
# dependency, pinned to match torch. transformers 5.24.0 is the newest release that installs from
# the package index with torch 2.14.1: 5.25.0 requires `kernels>=0.19.1,<0.20`, which the index
# lacks (its newest is 0.17.2).
CONVERT_REQUIRES = ["torch==2.14.1", "torchvision==0.29.1", "open_clip_torch==3.3.0",
                    "timm==1.0.31", "safetensors==0.8.0", "transformers==5.24.0"]

# `pip install '.[wandb]'`: config.wandb.project logs to Weights & Biases (basic/metric_writers.py).
WANDB_REQUIRES = ["wandb==0.31.0"]

# `pip install '.[tpu]'`: libtpu, pinned exactly as jax 0.10.2's own `tpu` extra pins it (jax's
# METADATA: `libtpu==0.0.42.*; extra == "tpu"` and `requests`; resolves libtpu 0.0.42.1). On a
# TPU VM it is the runtime; on any machine it is the TPU compiler, which `python -m basic.plan
# --topology=v5p:8x8x8` uses to compile the train step ahead of time without a TPU.
TPU_REQUIRES = ["libtpu==0.0.42.*", "requests"]

setuptools.setup(
    name="basic",
    version="0.1.0",
    description="BASIC-style contrastive image-text training in JAX/Flax, laptop to pod.",
    packages=setuptools.find_packages(include=["basic", "basic.*"]),
    package_data={"basic": ["assets/*", "evaluate/data/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==9.2.0", "gcp-storage-emulator==2026.7.19", "nbclient==0.11.0",
                             "nbformat==5.11.1", "ipykernel==7.4.0", "matplotlib==3.11.2",
                             "pytest-xdist==3.8.0", "ruff==0.17.5"] + WANDB_REQUIRES,
                    "convert": CONVERT_REQUIRES,
                    "wandb": WANDB_REQUIRES,
                    "tpu": TPU_REQUIRES},
)
