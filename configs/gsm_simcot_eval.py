"""Evaluate a GSM8K SIM-CoT checkpoint on the test set at the final stage (10 thoughts).

The reference's `gsm_simcot_eval.yaml` sets `resume: 3`, which evaluates at stage 1 (2 of the
10 thoughts the model was trained with); the paper's 12.2 generated tokens imply the final
stage, which is what this config evaluates (docs/simcot.md).
"""
from configs import gsm_simcot


def get_config():
    c = gsm_simcot.get_config()
    c.name = "gsm-simcot-eval"
    c.only_eval = True
    c.val_path = "data/gsm_test.json"
    c.resume = 35  # stage 11 > max_latent_stage 5: every step a thought, 5 x 2 = 10 thoughts
    c.load_model_path = "runs/gsm-simcot/checkpoints"
    return c
