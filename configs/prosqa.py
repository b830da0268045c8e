"""ProsQA Coconut: 6 stages of 5 epochs, one thought per step, 50 epochs, effective batch 128."""
from coconut_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "prosqa-coconut"
    c.method = "coconut"
    c.train_path, c.val_path = "data/prosqa_train.json", "data/prosqa_valid.json"
    c.c_thought, c.epochs_per_stage, c.max_latent_stage = 1, 5, 6
    c.num_epochs = 50
    c.global_batch_size = 128
    return c
