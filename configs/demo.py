"""The offline demo: a generated ProsQA-style task and a small GPT-2 trained from scratch on CPU.

A CoT stage, then stages that replace one reasoning step each with a continuous thought.
Nothing is downloaded: the data generator and the tokenizer/model builder run locally.
"""
from coconut_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "demo"
    c.method = "coconut"
    c.c_thought = 1
    c.max_latent_stage = 3
    c.epochs_per_stage = 2
    c.num_epochs = 8
    c.global_batch_size = 32
    c.eval_batch_size = 100
    c.max_new_tokens = 96  # a written chain of 3-6 steps needs ~60-90 tokens with this tokenizer
    c.lr = 1e-3
    c.weight_decay = 0.01
    c.checkpoint_every_steps = 0
    c.print_examples = 1
    c.pad_to_multiple = 32
    c.static_shapes = True
    c.model_id = ""
    c.prepare.kind = "synthetic_prosqa"
    c.prepare.train = 1000
    c.prepare.valid = 100
    c.prepare.vocab_size = 400
    c.prepare.n_layer = 2
    c.prepare.n_embd = 96
    c.prepare.n_head = 4
    c.prepare.n_positions = 1024
    return c
