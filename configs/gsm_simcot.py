"""GSM8K SIM-CoT: Coconut plus step-level supervision of the thoughts, from the Coconut run of
configs/gsm.py (the SIM-CoT repository's `Coconut/args/gsm_simcot.yaml`).

    python -m coconut_jax.train --config configs/gsm_simcot.py

The auxiliary decoder starts from `model_id`'s pretrained GPT-2 (not from the Coconut run);
`load_model_path` fills the base. Evaluate with configs/gsm_simcot_eval.py.
"""
from coconut_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "gsm-simcot"
    c.method = "simcot"
    c.train_path, c.val_path = "data/gsm_train.json", "data/gsm_valid.json"
    # gsm_simcot.yaml: c_thought 2, epochs_per_stage 3, max_latent_stage 5 (the SIM-CoT
    # repository's Coconut also uses 5 stages), pad_latent_to_max, uniform_prob 0.
    c.c_thought, c.epochs_per_stage, c.max_latent_stage = 2, 3, 5
    c.pad_latent_to_max = True
    c.uniform_prob = 0.0
    c.step_groups = "brackets"  # the reference's parse of GSM8K-Aug's <<...>> steps (docs/simcot.md)
    c.resume = 3                # gsm_simcot.yaml `resume: 3`: starts at stage 1
    c.num_epochs = 35           # gsm_simcot.yaml; the published model is its checkpoint 30
    c.global_batch_size = 64    # batch_size_training 8 on 8 GPUs
    c.lr, c.weight_decay = 1e-4, 0.01
    c.reset_optimizer = True
    c.bf16 = False              # fp32 (`bf16: False`)
    c.load_model_path = "runs/gsm-coconut/checkpoints"
    return c
