from setuptools import find_packages, setup

setup(
    name="coconut_jax",
    version="0.1.0",
    description="Coconut (Chain of Continuous Thought) in JAX/Flax: latent reasoning with a curriculum, on GPUs and TPU pods",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["coconut_jax", "coconut_jax.*", "data_prep"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "huggingface_hub",
        "ml_collections>=1.0",
        "absl-py",
        "pyyaml",
        "numpy",
        "tqdm",
        "wandb",
        "matplotlib",
    ],
    extras_require={
        # JAX for the accelerator: NVIDIA GPUs (CUDA 12 wheels, drivers from the system) or Cloud TPU.
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "torch": ["torch"],
        # TFDS datasets (data_prep.tfds, tfds:NAME/SPLIT paths); TensorFlow is not needed.
        # importlib_resources: tensorflow-datasets imports it without declaring it.
        "tfds": ["tensorflow-datasets>=4.9.4", "importlib_resources"],
        # gs:// paths (etils.epath's backend for buckets; Orbax's arrays go through TensorStore).
        "gcs": ["gcsfs"],
        "test": ["pytest", "pytest-xdist", "filelock", "torch==2.13.0", "peft", "nbformat", "nbclient", "ipykernel",
                 "gcsfs", "gcp-storage-emulator"],
    },
)
