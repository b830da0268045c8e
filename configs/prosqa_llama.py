"""ProsQA on Llama-3.2-1B-Instruct: a Coconut run from the pretrained model, and the test-set
evaluation, as for GPT-2 (configs/prosqa.py, prosqa_eval.py):

    python -m coconut_jax.train --config configs/prosqa_llama.py
    python -m coconut_jax.train --config configs/prosqa_llama.py:eval

No published Coconut table exists for Llama on ProsQA; these settings follow what is published:
- lr 1e-5 and fewer epochs per stage than GPT-2's 5: the Coconut authors' advice for Llama
  (facebookresearch/coconut issue #11). Two epochs per stage over the paper's 6 stages of one
  thought per step, then 3 more at the last stage: 15 epochs against GPT-2's 50.
- the Instruct model and bf16: as the follow-up methods reporting on Llama-3.2-1B (CODI,
  SIM-CoT, CoLaR, PCCoT).
- effective batch 128, AdamW with weight decay 0.01: the paper's ProsQA run.
"""
from coconut_jax.config import base_config

RUNS = ("coconut", "eval")


def get_config(run: str = "coconut"):
    if run not in RUNS:
        raise ValueError(f"configs/prosqa_llama.py:{run}: the run must be one of {', '.join(RUNS)}")
    c = base_config()
    c.name, c.method = "prosqa-llama-coconut", "coconut"
    c.model_id = "meta-llama/Llama-3.2-1B-Instruct"
    c.train_path, c.val_path = "data/prosqa_train.json", "data/prosqa_valid.json"
    c.c_thought, c.epochs_per_stage, c.max_latent_stage = 1, 2, 6
    c.num_epochs = 15
    c.lr = 1e-5
    c.bf16 = True
    c.global_batch_size = 128
    if run == "eval":
        c.name, c.only_eval = "prosqa-llama-coconut-eval", True
        c.val_path = "data/prosqa_test.json"
        c.resume = 12
        c.load_model_path = "runs/prosqa-llama-coconut/checkpoints"
    return c
