"""docs/library.md's training-loop example runs as written, and does what the page says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"


def example_code() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- training-loop-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/library.md lost its training-loop example"
    return match.group(1)


def test_training_loop_example_runs_and_logs_flat_per_class_metrics(capsys):
    space: dict = {}
    exec(compile(example_code(), str(DOC), "exec"), space)
    history, model, classes = space["history"], space["model"], space["classes"]
    assert len(history) == 3                     # epochs 1, 3 and 5
    assert model.training                         # quick_audit gave the train mode back
    assert all(p.grad is not None for p in model.parameters())   # the training's, untouched by the audit
    for metrics in history:
        assert all(isinstance(v, (int, float)) for v in metrics.values())
        for name in classes:
            assert 0 <= metrics[f"robaudit/robust/{name}"] <= metrics[f"robaudit/clean/{name}"] <= 1
    assert history[-1]["robaudit/clean_acc"] > 1 / 3   # the toy model learns; the log shows it
    assert capsys.readouterr().out.count("robaudit/robust_nsd") == 3


def test_quick_audit_does_not_touch_gradients_set_by_training():
    import robaudit

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(9, 3, 2, 2), torch.arange(9) % 3
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    robaudit.quick_audit(model, x, y, steps=2)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
