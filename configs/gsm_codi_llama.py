"""GSM8K CODI on Llama-3.2-1B-Instruct: the reference's scripts/train_llama1b_gsm8k-aug.sh, and
its test-set evaluation (docs/codi.md).

    python -m coconut_jax.train --config configs/gsm_codi_llama.py
    python -m coconut_jax.train --config configs/gsm_codi_llama.py:eval

As configs/gsm_codi.py but for: lr 8e-4, 10 epochs, 32 per device x 4 accumulation steps,
distillation weight 20, records of at most 200 tokens, LoRA on every projection. Published:
55.6% on the GSM8K test set.
"""
from configs.gsm_codi import RUNS, recipe
from coconut_jax.config import base_config


def get_config(run: str = "train"):
    if run not in RUNS:
        raise ValueError(f"configs/gsm_codi_llama.py:{run}: the run must be one of {', '.join(RUNS)}")
    c = recipe(base_config())
    c.name = "gsm-codi-llama"
    c.model_id = "meta-llama/Llama-3.2-1B-Instruct"
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.lr = 8e-4                    # --learning_rate 8e-4
    c.num_epochs = 10              # --num_train_epochs 10
    c.global_batch_size, c.gradient_accumulation_steps = 128, 4  # 32 per device x 4
    c.codi.distill_factor = 20.0   # --distill_loss_factor 20
    c.codi.max_token_num = 200     # --max_token_num 200
    if run == "eval":
        c.name, c.only_eval = "gsm-codi-llama-eval", True
        c.val_path = "data/gsm_test.json"
        c.load_model_path = "runs/gsm-codi-llama/checkpoints"
    return c
