"""GSM8K CODI + SIM-CoT's step decoder on GPT-2: SIM-CoT's repository's
CODI/scripts/train_gpt2_gsm8k-aug-decoder-2.sh, which is the CODI GPT-2 recipe (configs/gsm_codi.py)
with `--use_decoder True` and nothing else changed (docs/simcot.md).

    python -m coconut_jax.train --config configs/gsm_codi_simcot.py
    python -m coconut_jax.train --config configs/gsm_codi_simcot.py:eval

The decoder is a second copy of `model_id`'s pretrained GPT-2, fully trained by the same AdamW
(lr 3e-3, weight decay 0.1, the same clipping), as the reference trains it. Published (SIM-CoT's
table): CODI 42.0 -> 42.6 on the GSM8K test set.
"""
from configs import gsm_codi
from configs.gsm_codi import RUNS


def get_config(run: str = "train"):
    if run not in RUNS:
        raise ValueError(f"configs/gsm_codi_simcot.py:{run}: the run must be one of {', '.join(RUNS)}")
    c = gsm_codi.get_config(run)
    c.method = "codi_simcot"
    c.name = "gsm-codi-simcot" + ("-eval" if run == "eval" else "")
    if run == "eval":
        c.load_model_path = "runs/gsm-codi-simcot/checkpoints"
    return c
