import json

from coconut_jax.plot import plot_metrics


def test_plot_writes_a_png_from_a_metrics_file(tmp_path):
    events = []
    for step in range(1, 13):
        events.append({"step": step, "epoch": 1 + (step - 1) // 4, "stage": (step - 1) // 4, "train/loss": 5 - step / 10})
        if step % 4 == 0:
            events.append({"step": step, "epoch": step // 4, "stage": (step - 1) // 4, "eval/loss": 4.0,
                           "eval/acc": step / 12, "eval/cot_em": 0.0, "eval/new_tokens": 9.0, "eval/thoughts": 1})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    out = plot_metrics(str(path))
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
