"""ProntoQA Coconut: same schedule as ProsQA."""
from configs import prosqa


def get_config():
    c = prosqa.get_config()
    c.name = "prontoqa-coconut"
    c.train_path, c.val_path = "data/prontoqa_train.json", "data/prontoqa_valid.json"
    return c
