"""Coconut data: JSON records -> validated examples -> token ids -> per-stage sequences -> batches.

Plain Python/NumPy (no JAX), one module per concern:
  records.py      the JSON format and its validation
  tokens.py       tokenization (SPEC §1) into flat arrays (`TokenizedSet`)
  token_cache.py  the verified on-disk token cache and `load_dataset`
  curriculum.py   a record's sequence at a stage (SPEC §3; the schedule: `methods.Curriculum`)
  batching.py     batches with the first latent aligned (SPEC §4) and an epoch's plan
  step_targets.py what each group of thoughts replaced, for step supervision (SPEC-SIMCOT §2)

Token ids live in flat arrays (memory-mapped from the cache), and an epoch's sequences are a
few integers per record computed with NumPy, so a 385k-record set costs its tokens in int32 and
no per-record Python objects. Behaviour follows the reference implementation exactly
(docs/faithfulness.md).
"""
from coconut_jax.data.batching import Batch, EpochPlan, PlanSettings, collate, round_up
from coconut_jax.data.curriculum import (IGNORE, OVERLONG_POLICIES, Sequences, check_lengths,
                                         draw_stages, epoch_order, eval_prompt, training_sequence)
from coconut_jax.data.records import DataError, load_records, validate_record
from coconut_jax.data.token_cache import (CACHE_FORMAT, cache_key, file_digest, load_dataset, read_cache,
                                          write_cache)
from coconut_jax.data.step_targets import RULES as STEP_RULES, StepIds, StepTargets, step_ids
from coconut_jax.data.tokens import TOKENIZE_CHUNK, Example, TokenizedSet, question_example, tokenize_records

__all__ = ["Batch", "EpochPlan", "PlanSettings", "collate", "round_up", "IGNORE", "OVERLONG_POLICIES", "Sequences",
           "check_lengths", "draw_stages", "epoch_order", "eval_prompt", "training_sequence", "DataError",
           "load_records", "validate_record", "CACHE_FORMAT", "cache_key", "file_digest", "load_dataset", "read_cache",
           "write_cache", "STEP_RULES", "StepIds", "StepTargets", "step_ids", "TOKENIZE_CHUNK", "Example", "TokenizedSet", "tokenize_records",
           "question_example"]
