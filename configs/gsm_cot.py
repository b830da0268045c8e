"""GSM8K CoT (stage 0), the paper's first GSM8K run: 25 epochs, effective batch 128."""
from coconut_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "gsm-cot"
    c.method = "cot"
    c.train_path, c.val_path = "data/gsm_train.json", "data/gsm_valid.json"
    c.step_groups = "brackets"  # with --config.method=simcot: the reference's <<...>> groups
    c.c_thought, c.epochs_per_stage, c.max_latent_stage = 2, 3, 3
    c.num_epochs = 25
    c.global_batch_size = 128
    return c
