"""A seconds-long run for tests and smoke checks: generated ProsQA-style data, a 1-layer GPT-2."""
from coconut_jax.config import base_config, small_model_on_cpu


def get_config():
    c = base_config()
    c.name = "tiny"
    c.method = "coconut"
    c.c_thought = 1
    c.max_latent_stage = 2
    c.epochs_per_stage = 1
    c.num_epochs = 3
    c.global_batch_size = 8
    c.eval_batch_size = 16
    c.max_new_tokens = 16
    c.lr = 1e-3
    c.checkpoint_every_steps = 0
    c.print_examples = 0
    c.pad_to_multiple = 16
    c.static_shapes = True
    small_model_on_cpu(c)
    c.model_id = ""
    c.prepare.kind = "synthetic_prosqa"
    c.prepare.train = 32
    c.prepare.valid = 8
    c.prepare.vocab_size = 300
    c.prepare.n_layer = 1
    c.prepare.n_embd = 32
    c.prepare.n_head = 2
    return c
