"""Runs a reference YAML file unchanged: --config configs/yaml.py:path/to/args.yaml"""
from coconut_jax.config import from_reference_yaml


def get_config(path):
    return from_reference_yaml(path)
