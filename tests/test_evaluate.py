"""Evaluation: prompts that do not fit the context, and batches padded with unscored rows."""
import numpy as np
import pytest

from coconut_jax import data, evaluate, hf, latent_vocab, methods, answers
from coconut_jax.models.gpt2 import GPT2Model
from tests.conftest import SAMPLE_RECORDS


@pytest.fixture(scope="module")
def setup(tiny_dir):
    tok = hf.load_tokenizer(tiny_dir)
    config, params = hf.load_pretrained(tiny_dir)
    config, params = latent_vocab.add_latent_rows(config, params, tok)
    examples = data.tokenize_records(SAMPLE_RECORDS, tok)
    return GPT2Model(config), params, tok, latent_vocab.latent_tokens(tok), examples


def _predict(setup, batch_size, context, overlong="error", row_multiple=1):
    model, params, tok, tokens, examples = setup
    cur = methods.Curriculum("coconut", 1, 2, 1)
    return answers.generate_predictions(model, params, examples, SAMPLE_RECORDS, 2, cur, tokens, tok,
                                         batch_size=batch_size, max_new_tokens=4, multiple=8, context=context,
                                         overlong=overlong, row_multiple=row_multiple)


def test_filler_rows_are_not_scored(setup):
    """Four questions in two batches of 3 rows (2 + 1 filler each) or one of 4: the same predictions."""
    a, b = _predict(setup, 3, 128, row_multiple=3), _predict(setup, 8, 128)
    assert [p.index for p in a] == [0, 1, 2, 3] and [p.text for p in a] == [p.text for p in b]


@pytest.mark.parametrize("n, size, multiple, rows", [
    (200, 64, 1, 50), (200, 64, 8, 56), (192, 64, 1, 64), (8, 64, 1, 8), (9, 8, 1, 5), (9, 8, 4, 8), (1, 64, 8, 8),
    (0, 64, 1, 1)])
def test_questions_spread_evenly_over_the_fewest_batches(n, size, multiple, rows):
    assert answers.batch_rows(n, size, multiple) == rows


def test_prompt_that_does_not_fit_the_context_is_an_error_or_skipped(setup):
    _, _, _, tokens, examples = setup
    cur = methods.Curriculum("coconut", 1, 2, 1)
    lengths = [len(data.eval_prompt(e, 2, cur, tokens)) for e in examples]
    context = sorted(lengths)[-1] + 4 - 2  # the longest prompt plus its new tokens is one too many
    with pytest.raises(data.DataError, match=r"validation prompts at stage 2 plus max_new_tokens=4: 1 sequence"):
        _predict(setup, 8, context)
    preds = _predict(setup, 8, context, overlong="skip")
    longest = int(np.argmax(lengths))
    assert [p.index for p in preds] == [i for i in range(4) if i != longest]
    summary = evaluate.summarize(preds, questions=4)
    assert summary["skipped"] == 1 and summary["acc"] == sum(p.correct for p in preds) / 4
