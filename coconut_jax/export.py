"""Export a trained run as a Hugging Face directory, or its LoRA adapters in PEFT's format.

    python -m coconut_jax.export RUN_DIR --out DIR [--step N | --best-any-stage] [--peft] [--push-to-hub REPO]

RUN_DIR is `save_path/name`. The step is the model of the run (`trained.model_step`: the best
by accuracy within the last stage it reached, else its latest) unless `--step` names one or
`--best-any-stage` asks for the best of every stage (what `load_model_path=RUN_DIR/checkpoints`
hands off). The directory holds
config.json, model.safetensors (LoRA merged), the tokenizer with the latent tokens,
`coconut_jax.json` (the prompt settings `coconut_jax.generate` reads) and, for a method that
generates with a part of its own beside the model, `part_<name>.safetensors`;
`from_pretrained` loads the model, and the directory is a valid `load_model_path` of ours. `--peft` writes `adapter_config.json` and
`adapter_model.safetensors` instead (docs/lora.md). `--push-to-hub` uploads the directory
with `huggingface_hub` (logged in with `hf auth login` or HF_TOKEN).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from coconut_jax import checkpoint, files, hf, peft_format, rundir, trained, weights


def peft_base(t: trained.Trained) -> str:
    """What a PEFT export's adapters load onto: `model_id`, or the weights the run started
    from when it was handed them (`load_model_path`), which must be exported themselves."""
    source = (t.base or {}).get("source", {})
    return t.model_id if source.get("kind") == "model" else weights.Source(**source).describe()


def export(t: trained.Trained, out: str, peft: bool = False, overwrite: bool = False) -> str:
    """Writes `out` atomically (never half a directory; an existing one only with `overwrite`)."""
    if peft and t.lora_model is None:
        raise trained.TrainedError(f"--peft: {t.where} was trained without LoRA (lora.rank=0); export it without --peft")
    with hf.atomic_dir(out, overwrite) as tmp:
        if peft:
            peft_format.write(t.lora_model, t.lora_params, tmp, peft_base(t))
            t.tok.save_pretrained(tmp)
        else:
            hf.write_hf(t.config, t.params, tmp, t.tok)
        for name, params in t.parts.items():  # what the method generates with beside the model
            hf.write_tree(params, os.path.join(tmp, weights.part_file(name)))
        with open(os.path.join(tmp, trained.SETTINGS_FILE), "w") as f:
            json.dump(t.settings, f, indent=1)
    return files.abspath(out)


def push(out: str, repo: str, api=None) -> str:
    """Uploads `out` to the hub repository `repo` (created if missing); returns its URL."""
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=files.local_copy(out), repo_id=repo, commit_message="coconut_jax export")
    return f"https://huggingface.co/{repo}"


def main(argv=None, api=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coconut_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the run's directory, save_path/name")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--step", type=int, default=None,
                   help="the checkpoint step (default: the best by accuracy in the last stage reached)")
    p.add_argument("--best-any-stage", dest="best_any_stage", action="store_true",
                   help="the run's best step by accuracy over every stage (best.json), as a hand-off takes it")
    p.add_argument("--peft", action="store_true", help="write the LoRA adapters in PEFT's format")
    p.add_argument("--push-to-hub", dest="push_to_hub", default=None, metavar="REPO",
                   help="upload the written directory to this hub repository")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    a = p.parse_args(argv)
    try:
        t = trained.from_run(a.run_dir, a.step, a.best_any_stage)
        print(f"exporting {t.where}, trained at {trained.describe_stage(t.settings)}", flush=True)
        out = export(t, a.out, a.peft, a.overwrite)
    except (trained.TrainedError, rundir.RunDirError, checkpoint.CheckpointFault, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if a.peft:
        print(f"base: {peft_base(t)} with its vocabulary resized to the tokenizer's {len(t.tok)} tokens")
    if a.push_to_hub:
        print(f"uploaded to {push(out, a.push_to_hub, api)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
