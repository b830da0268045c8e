"""Evaluate a ProsQA Coconut checkpoint on the test set at the last stage."""
from configs import prosqa


def get_config():
    c = prosqa.get_config()
    c.name = "prosqa-coconut-eval"
    c.only_eval = True
    c.val_path = "data/prosqa_test.json"
    c.resume = 40
    c.load_model_path = "runs/prosqa-coconut/checkpoints"
    return c
