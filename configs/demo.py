"""The offline demo: a generated ProsQA-style task and a small GPT-2 trained from scratch on CPU.

A CoT stage, then stages that replace one reasoning step each with a continuous thought.
Nothing is downloaded: the data generator and the tokenizer/model builder run locally.
The graphs are smaller than the published ProsQA (6-10 nodes, 2-3 reasoning steps, 40 concept
names instead of 175) so a 2-layer model learns the task on 2 CPU cores (docs/demo.md says how long); `configs/prosqa.py` is
the published setting. The model starts with a fact-lookup circuit wired into its initial weights
(`prepare.induction_heads`, see `coconut_jax/demo/induction.py`): from GPT-2's random init that circuit
takes far longer to grow than the demo's budget, and without it the demo ends near chance.
"""
from coconut_jax.config import base_config, small_model_on_cpu


def get_config():
    c = base_config()
    c.name = "demo"
    c.method = "coconut"
    # Two thoughts per replaced step, two epochs per stage, and the last six epochs at the full
    # latent stage (every step a thought): of the settings tried over the CoT-then-thoughts
    # budget of 12 epochs, these brought the final stage closest to the CoT stage (docs/demo.md).
    c.c_thought = 2
    c.max_latent_stage = 3
    c.epochs_per_stage = 2
    c.num_epochs = 12
    c.global_batch_size = 16
    c.max_new_tokens = 40  # a written chain of 2-3 steps and the answer fit in ~30 tokens
    c.lr = 5e-4
    c.weight_decay = 0.01
    # Tuned for the small model: in trials, batch 16 and Adam's state kept across epochs learned
    # much faster than the published batch 128, reset per epoch. At lr 1e-3 two runs of three lost
    # the wired lookup (steps like "Every X is a X"); 5e-4 kept it.
    c.reset_optimizer = False
    c.checkpoint_every_steps = 0
    c.print_examples = 1
    c.pad_to_multiple = 32
    c.static_shapes = True
    small_model_on_cpu(c)
    c.model_id = ""
    c.prepare.kind = "synthetic_prosqa"
    c.prepare.train = 6000
    c.prepare.valid = 1000  # an accuracy's standard error 0.012-0.016 (docs/demo.md)
    c.prepare.min_nodes = 6
    c.prepare.max_nodes = 10
    c.prepare.steps = (2, 3)
    c.prepare.n_concepts = 40
    c.prepare.vocab_size = 700  # every name and concept is one token
    c.prepare.n_layer = 2
    c.prepare.n_embd = 128  # the wired circuit needs 4 blocks of one head's width (32)
    c.prepare.n_head = 4
    c.prepare.induction_heads = True
    c.prepare.n_positions = 1024
    return c
