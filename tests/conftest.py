import os

import jax
import pytest

jax.config.update("jax_enable_x64", False)
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

SAMPLE_RECORDS = [
    {"question": "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or zumpus?",
     "steps": ["Alex is a wumpus.", "Every wumpus is a yumpus."], "answer": "Alex is a yumpus."},
    {"question": "Tom has 3 apples and buys 2 more. How many?", "steps": ["<<3+2=5>>"], "answer": "5"},
    {"question": "Sara had 1,200 coins and spent 200. How many are left?",
     "steps": ["<<1200-200=1000>>", "<<1000*1=1000>>", "<<1000+0=1000>>"], "answer": "1,000"},
    {"question": "What is 7 times 6?", "steps": [], "answer": "42"},
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny GPT-2 + byte-level BPE tokenizer in HF format, built offline."""
    from coconut_jax import tiny
    texts = tiny.record_texts(SAMPLE_RECORDS) * 20
    return tiny.build(texts, str(tmp_path_factory.mktemp("models") / "tiny"), vocab_size=400,
                      n_layer=2, n_embd=64, n_head=4, n_positions=128, seed=1)


def shared_file(name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} not present (reference data is not part of the repository)")
    return path
