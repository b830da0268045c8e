"""GSM8K CODI on GPT-2: the reference's recipe (its scripts/train_gpt2_gsm8k-aug.sh) and the
test-set evaluation its test script runs (docs/codi.md).

    python -m coconut_jax.train --config configs/gsm_codi.py
    python -m coconut_jax.train --config configs/gsm_codi.py:eval

Trains from `model_id`'s pretrained GPT-2 (no CoT stage, no curriculum) on the GSM8K-Aug data
data_prep prepares; the teacher reads each record's steps joined by spaces, the last one
dropped. Published: 43.7% on the GSM8K test set.
"""
from coconut_jax.config import base_config

RUNS = ("train", "eval")


def recipe(c):
    """What both CODI recipes share (the reference's scripts and its defaults)."""
    c.method = "codi"
    c.train_path, c.val_path = "data/gsm_train.json", "data/gsm_valid.json"
    c.codi.num_latent = 6          # --num_latent 6 (also inf_latent_iterations 6 at test time)
    # prj_dim: the model's width (--prj_dim 768 / 2048 in the two scripts), the setting's default 0.
    c.lora.rank, c.lora.alpha, c.lora.dropout = 128, 32.0, 0.1  # train.py's LoraConfig (dropout hard-coded 0.1)
    c.weight_decay = 0.1           # --weight_decay 0.1, on weights only (Trainer's rule)
    c.decay_norms_and_biases = False
    c.warmup_ratio, c.lr_schedule = 0.03, "cosine"  # --warmup_ratio 0.03 --lr_scheduler_type cosine
    c.max_grad_norm = 2.0          # --max_grad_norm 2.0
    c.reset_optimizer = False      # one Trainer run: the moments persist across epochs
    c.bf16, c.param_dtype = True, "bfloat16"  # --bf16: the base in bf16, adapters and projection in f32
    c.seed = 11                    # --seed 11
    c.eval_batch_size = 128        # test.py's batch
    return c


def get_config(run: str = "train"):
    if run not in RUNS:
        raise ValueError(f"configs/gsm_codi.py:{run}: the run must be one of {', '.join(RUNS)}")
    c = recipe(base_config())
    c.name = "gsm-codi"
    c.model_id = "openai-community/gpt2"
    c.lora.targets = ("c_attn", "c_proj", "c_fc")  # train.py's GPT-2 targets (c_proj: attention and MLP)
    c.lr = 3e-3                    # --learning_rate 3e-3
    c.num_epochs = 40              # --num_train_epochs 40
    c.global_batch_size, c.gradient_accumulation_steps = 128, 2  # 64 per device x 2 accumulation steps
    if run == "eval":
        c.name, c.only_eval = "gsm-codi-eval", True
        c.val_path = "data/gsm_test.json"
        c.load_model_path = "runs/gsm-codi/checkpoints"
    return c
