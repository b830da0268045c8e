"""GSM8K Coconut, started at stage 1 from a CoT checkpoint (~40% validation accuracy).

    python -m coconut_jax.train --config configs/gsm.py --config.load_model_path=runs/gsm-cot/checkpoints/<step>
"""
from coconut_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "gsm-coconut"
    c.method = "coconut"
    c.train_path, c.val_path = "data/gsm_train.json", "data/gsm_valid.json"
    c.step_groups = "brackets"  # with --config.method=simcot: the reference's <<...>> groups
    c.c_thought, c.epochs_per_stage, c.max_latent_stage = 2, 3, 3
    c.num_epochs = 25
    c.resume = 3
    c.global_batch_size = 128
    c.load_model_path = "runs/gsm-cot/checkpoints"
    return c
