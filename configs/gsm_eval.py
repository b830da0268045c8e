"""Evaluate a GSM8K Coconut checkpoint on the test set at the last stage."""
from configs import gsm


def get_config():
    c = gsm.get_config()
    c.name = "gsm-coconut-eval"
    c.only_eval = True
    c.val_path = "data/gsm_test.json"
    c.resume = 25
    c.load_model_path = "runs/gsm-coconut/checkpoints"
    return c
