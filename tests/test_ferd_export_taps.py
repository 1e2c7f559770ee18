"""FERD's Fairness-Aware Examples on a torch.export (.pt2) teacher: its layers become hookable
(torch.export.unflatten), with the same features and the same hook-replaced logits as the
eager module the program was exported from (the independent computation)."""

import torch
from torch import nn

from robaudit.audit.models.loading import load_model, save_export
from robaudit.remediate.ferd_export_taps import hookable_teacher
from robaudit.remediate.ferd_ib import find_ib_layer

from test_ferd import CLASSES, C, SHAPE, BNTeacher, config, tiny_student


def _pt2_teacher(tmp_path):
    torch.manual_seed(0)
    eager = BNTeacher().eval()
    save_export(eager, str(tmp_path / "teacher.pt2"), torch.rand(2, *SHAPE))
    return eager, load_model(str(tmp_path / "teacher.pt2"), num_classes=C, input_shape=SHAPE,
                             dataset_classes=list(CLASSES))


def _hooked(module, name, replace=None):
    seen = []

    def hook(mod, inputs, output):
        seen.append(output.detach().clone())
        return None if replace is None else replace(output)

    handle = dict(module.named_modules())[name].register_forward_hook(hook)
    return seen, handle


def test_pt2_teacher_layers_are_hookable_like_the_eager_module(tmp_path):
    eager, loaded = _pt2_teacher(tmp_path)
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    name, _, why = find_ib_layer(loaded.module, x)
    assert name is None                                               # the flat graph: no layer to hook
    teacher, note = hookable_teacher(loaded.module, x)
    assert note is not None and "unflattened" in note
    name, layer, why = find_ib_layer(teacher, x)
    eager_name, _, _ = find_ib_layer(eager, x)
    assert name is not None and name.endswith(eager_name), (name, eager_name)
    # same feature map, and the same logits when the hook replaces the layer's output (what the IB does)
    halve = lambda out: out * 0.5                                     # noqa: E731
    seen_pt2, h1 = _hooked(teacher, name, halve)
    seen_eager, h2 = _hooked(eager, eager_name, halve)
    with torch.no_grad():
        logits_pt2, logits_eager = teacher(x), eager(x)
    h1.remove(), h2.remove()
    # float32, the same operations in the same order: agreement to rounding (1e-5 of the scale)
    assert torch.allclose(seen_pt2[0], seen_eager[0], atol=1e-5 * float(seen_eager[0].abs().max()))
    assert torch.allclose(logits_pt2, logits_eager, atol=1e-5 * float(logits_eager.abs().max().clamp_min(1)))
    with torch.no_grad():
        plain = eager(x)
    assert not torch.allclose(plain, logits_eager)                   # the replacement did change the logits


def test_ferd_runs_fae_with_a_pt2_teacher(tmp_path):
    from robaudit.remediate.ferd import run_ferd

    _, loaded = _pt2_teacher(tmp_path)
    summary = run_ferd(config(tmp_path / "run"), teacher=loaded, student_module=tiny_student())
    method = summary["training"]["options"]["method"]
    assert method["nonrobust_active"] == "ib"
