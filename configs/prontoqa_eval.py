"""Evaluate a ProntoQA Coconut checkpoint on the test set at the last stage."""
from configs import prontoqa


def get_config():
    c = prontoqa.get_config()
    c.name = "prontoqa-coconut-eval"
    c.only_eval = True
    c.val_path = "data/prontoqa_test.json"
    c.resume = 40
    c.load_model_path = "runs/prontoqa-coconut/checkpoints"
    return c
