"""GSM8K on Llama-3.2-1B-Instruct: a CoT run, a Coconut run from its best checkpoint, and the
test-set evaluation, as for GPT-2 (configs/gsm_cot.py, gsm.py, gsm_eval.py):

    python -m coconut_jax.train --config configs/gsm_llama.py:cot
    python -m coconut_jax.train --config configs/gsm_llama.py
    python -m coconut_jax.train --config configs/gsm_llama.py:eval

No published Coconut table exists for Llama; these settings follow what is published:
- lr 1e-5 and few epochs per stage: the Coconut authors' advice for Llama
  (facebookresearch/coconut issue #11: "use a smaller lr (e.g. 1e-5) and fewer epochs per
  stage to avoid overfitting").
- 5 epochs without thoughts, then 5 with them: CODI's Coconut baseline on LLaMA-3.2-1B
  (CODI, Appendix A, as corrected in zhenyi4/codi issue #8: "learning rate of 1e-5 and train
  5 epochs for both stages"). Here the Coconut run starts at stage 1 (resume=1, one epoch per
  stage), so 5 epochs cover stages 1-3 and two more at stage 3.
- the Instruct model, 2 thoughts per step, 3 latent stages and bf16: the GSM8K settings of the
  paper (c_thought 2, max_latent_stage 3) with the model and precision of the follow-up
  methods reporting on Llama-3.2-1B (CODI, SIM-CoT, CoLaR, PCCoT).
- effective batch 128, AdamW with weight decay 0.01: the paper's GSM8K runs.
Params stay f32 (with Adam's moments about 20 GB: one 80 GB GPU holds them; on smaller
devices add `--config.mesh.fsdp=N` or `--config.param_dtype=bfloat16`).
"""
from coconut_jax.config import base_config

RUNS = ("cot", "coconut", "eval")


def get_config(run: str = "coconut"):
    if run not in RUNS:
        raise ValueError(f"configs/gsm_llama.py:{run}: the run must be one of {', '.join(RUNS)}")
    c = base_config()
    c.model_id = "meta-llama/Llama-3.2-1B-Instruct"
    c.train_path, c.val_path = "data/gsm_train.json", "data/gsm_valid.json"
    c.step_groups = "brackets"  # with --config.method=simcot: the reference's <<...>> groups
    c.c_thought, c.epochs_per_stage, c.max_latent_stage = 2, 1, 3
    c.lr = 1e-5
    c.bf16 = True
    c.global_batch_size = 128
    if run == "cot":
        c.name, c.method, c.num_epochs = "gsm-llama-cot", "cot", 5
        return c
    c.name, c.method = "gsm-llama-coconut", "coconut"
    c.resume, c.num_epochs = 1, 6
    c.load_model_path = "runs/gsm-llama-cot/checkpoints"
    if run == "eval":
        c.name, c.only_eval = "gsm-llama-coconut-eval", True
        c.val_path = "data/gsm_test.json"
        c.resume = 6
        c.load_model_path = "runs/gsm-llama-coconut/checkpoints"
    return c
