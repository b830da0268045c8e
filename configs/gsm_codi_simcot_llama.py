"""GSM8K CODI + SIM-CoT's step decoder on Llama-3.2-1B-Instruct: SIM-CoT's repository's
CODI/scripts/train_llama1b_gsm8k-aug-decoder.sh, the CODI Llama recipe (configs/gsm_codi_llama.py)
with `--use_decoder True` and its batch of 64 x 2 (CODI's is 32 x 4; the same 128 a step).

    python -m coconut_jax.train --config configs/gsm_codi_simcot_llama.py
    python -m coconut_jax.train --config configs/gsm_codi_simcot_llama.py:eval

Its 3B and 8B scripts are settings on this one (docs/simcot.md): Llama-3.2-3B-Instruct
`--config.model_id=meta-llama/Llama-3.2-3B-Instruct --config.lr=3e-4 --config.num_epochs=8`;
Llama-3.1-8B-Instruct `--config.model_id=meta-llama/Llama-3.1-8B-Instruct --config.lr=1e-4
--config.num_epochs=6 --config.gradient_accumulation_steps=16` (8 x 16). Published (SIM-CoT's
table): CODI 52.7 -> 56.1 (1B), 60.8 -> 62.3 (3B), 61.1 -> 64.1 (8B). The decoder trains whole
(the scripts'); `--config.step_decoder.lora_rank=128` trains adapters on it instead (ours: at 8B
123 instead of 173 GiB per device, docs/simcot.md).
"""
from configs import gsm_codi_llama
from configs.gsm_codi import RUNS


def get_config(run: str = "train"):
    if run not in RUNS:
        raise ValueError(f"configs/gsm_codi_simcot_llama.py:{run}: the run must be one of {', '.join(RUNS)}")
    c = gsm_codi_llama.get_config(run)
    c.method = "codi_simcot"
    c.gradient_accumulation_steps = 2  # --per_device_train_batch_size 64 --gradient_accumulation_steps 2
    c.name = "gsm-codi-simcot-llama" + ("-eval" if run == "eval" else "")
    if run == "eval":
        c.load_model_path = "runs/gsm-codi-simcot-llama/checkpoints"
    return c
