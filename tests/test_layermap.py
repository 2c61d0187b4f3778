"""S4-L0: the layer that carries the class signal is the peak; the hybrid rule; the logit lens."""

import numpy as np
import pytest
import torch

from mechreward import stats
from mechreward.errors import DataError
from mechreward.layermap import (commit_layer, cv_probe_auroc, layer_table, logit_lens_marker_prob, peak_layer,
                                 recommend_layer)
from mechreward.models import find_final_norm
from tiny import tiny_model

QWEN36_TYPES = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(40)]


def _synthetic(signal_layer=3, n=80, d=32, n_layers=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))
    pooled = {}
    for layer in range(n_layers):
        x = rng.normal(size=(n, d))
        if layer == signal_layer:
            x[:, :5] += 1.5 * labels[:, None]  # five dimensions separate correct from wrong
        pooled[layer] = x
    return pooled, labels


def test_the_layer_carrying_the_signal_is_the_peak_by_both_scores():
    pooled, labels = _synthetic(signal_layer=3)
    rows = layer_table(pooled, labels)
    assert [r["layer"] for r in rows] == list(range(6))
    assert peak_layer(rows, "d_top10") == 3 and peak_layer(rows, "probe_auroc") == 3
    r3 = rows[3]
    d = np.abs(stats.cohens_d(pooled[3][labels == 1], pooled[3][labels == 0]))
    assert r3["d_top10"] == pytest.approx(np.sort(d)[-10:].sum())
    assert r3["probe_auroc"] > 0.9 and all(0.25 < r["probe_auroc"] < 0.75 for r in rows if r["layer"] != 3)


def test_cv_probe_is_held_out_and_chance_on_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 50))
    labels = np.array([0, 1] * 100)
    # in-sample diff-of-means on 50 noise dimensions overfits; held out it does not
    w = x[labels == 1].mean(0) - x[labels == 0].mean(0)
    assert stats.auroc(x @ w, labels) > 0.7
    assert abs(cv_probe_auroc(x, labels, folds=5, seed=0) - 0.5) < 0.1
    with pytest.raises(DataError, match="at least 5 responses of each class"):
        cv_probe_auroc(x[:12], np.array([1] * 9 + [0] * 3), folds=5)


def test_hybrid_rule_moves_a_linear_attention_peak_to_the_next_full_attention_layer():
    assert recommend_layer(22, QWEN36_TYPES)[0] == 23  # published: peak L22 -> SAE at L23
    assert recommend_layer(23, QWEN36_TYPES)[0] == 23
    assert recommend_layer(0, QWEN36_TYPES)[0] == 3
    assert recommend_layer(22, ["full_attention"] * 40)[0] == 22  # dense: the peak itself
    assert recommend_layer(5, None)[0] == 5
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    assert recommend_layer(3, types)[0] == 1  # nothing downstream: nearest upstream


def test_commit_layer_is_the_largest_increase():
    assert commit_layer({0: 0.01, 1: 0.02, 2: 0.30, 3: 0.45, 4: 0.50}) == 2
    assert commit_layer({0: 0.5, 1: 0.1, 2: 0.2}) == 2


def test_logit_lens_applies_the_final_norm_then_the_head():
    model = tiny_model("qwen3")
    x = torch.randn(3, 64) * 4
    marker = [5, 17]
    got = logit_lens_marker_prob(model, {0: x}, marker)[0]
    with torch.no_grad():
        want = torch.softmax(model.lm_head(find_final_norm(model)(x)), -1)[:, marker].sum(-1).mean()
        no_norm = torch.softmax(model.lm_head(x), -1)[:, marker].sum(-1).mean()
    assert got == pytest.approx(float(want), rel=1e-5)
    assert abs(got - float(no_norm)) > 1e-4


def test_layermap_end_to_end_on_a_tiny_model(tmp_path):
    import json

    from mechreward.layermap import LayermapConfig, run_layermap
    from mechreward.models import ModelConfig
    from mechreward.rollouts import SamplingConfig
    from mechreward.run import Run
    from mechreward.tasks import TaskConfig
    from test_g1 import _letter_writing_model

    _letter_writing_model(tmp_path / "model")
    rows = [{"question": f"Is {i} even?", "options": ["yes", "no"], "answer_letter": "AB"[i % 2]} for i in range(40)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = LayermapConfig(model=ModelConfig(name_or_path=str(tmp_path / "model"), device="cpu"),
                         task=TaskConfig(name="mcq", source=str(tmp_path / "q.jsonl")),
                         sampling=SamplingConfig(greedy=False, max_new_tokens=16, batch_size=40), folds=3,
                         markers=["A"])
    run = Run(tmp_path / "run")
    report = run_layermap(cfg, run)
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2, 3]
    assert report["peak_layer"] == max(report["layers"], key=lambda r: r["d_top10"])["layer"]
    assert report["recommended_layer"] == report["peak_layer"]  # dense model
    assert report["commit_layer"] in range(1, 4) and 0 < report["n_correct"] < report["n_responses"]
    saved = json.loads((run.dir / "report.json").read_text())
    assert {"layers", "peak_layer", "commit_layer", "recommended_layer"} <= set(saved)
    assert (run.dir / "layermap.png").exists() and (run.dir / "report.md").exists()
