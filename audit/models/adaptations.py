"""What the model boundary did, as results.json records it (model.adaptations, docs/results-schema.md).

`describe` turns the decisions audit/models/adapters.py `build_boundary` made into the entries
input_layout, input_range, output, batch_size, class_map, class_names and pipeline.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from robaudit.audit.models.boundary_modules import PROB_FLOOR
from robaudit.audit.models.boundary_types import BoundaryRequest, ModelInfo


def _pipeline(request: BoundaryRequest, info: ModelInfo, layout: str, out_name: Optional[str],
              out_names: List[str], output_kind: str) -> List[str]:
    scale, fixed = request.scale, info.fixed_batch
    pipeline = ["x: NCHW, values in [0, 1] (robaudit's attack space; eps in [0, 1] units)"]
    if scale != 1.0:
        pipeline.append(f"x * {scale:g} (--input-range {request.input_range}; eps in the model's units "
                        f"= eps * {scale:g})")
    if request.mean is not None:
        pipeline.append(f"(x - mean) / std per channel ({request.mean_source}, in the model's units)")
    if layout == "nhwc":
        pipeline.append("NCHW -> NHWC")
    pipeline.append("the model" + (f", fed in chunks of its fixed batch size {fixed}"
                                   if fixed and info.batch_chunked else ""))
    if out_names and len(out_names) > 1:
        pipeline.append(f"output {out_name!r} of {len(out_names)}")
    if output_kind == "probs":
        pipeline.append(f"log(max(p, {PROB_FLOOR:.3g})): probabilities attacked as log-probabilities")
    if request.mapping is not None:
        pipeline.append("columns reordered by --class-map (column k = dataset class k)")
    return pipeline


def _batch_entry(info: ModelInfo) -> Optional[Dict[str, Any]]:
    fixed = info.fixed_batch
    if not fixed:
        return None
    if info.batch_chunked:
        note = (f"batch fixed at {fixed}: a batch of B images takes ceil(B / {fixed}) "
                f"forward calls (the last chunk zero-padded), so attacks run slower than on a "
                f"model with a dynamic batch")
    else:
        note = (f"the model declares batch size {fixed}, but its torch conversion gives the "
                f"same logits on other batch sizes (checked against onnxruntime), so it is fed "
                f"whole batches at no throughput cost")
    return {"fixed": fixed, "chunked": info.batch_chunked, "white_box": bool(info.white_box), "note": note}


def describe(request: BoundaryRequest, info: ModelInfo, layout: str, layout_reason: str,
             chosen: Tuple[Optional[str], List[str], str], output_kind: str,
             kind_reason: str) -> Dict[str, Any]:
    """The model.adaptations entries of the boundary (docs/results-schema.md)."""
    out_name, out_names, out_reason = chosen
    declared, mapping, names = info.declared_input_shape, request.mapping, request.names
    attacked_as = {"logits": "as given", "log-probs": "as given (log-probabilities are logits up to a "
                   "per-row constant)", "probs": f"log(max(p, {PROB_FLOOR:.3g}))"}[output_kind]
    return {
        "input_layout": {"layout": layout, "requested": request.input_layout,
                         "declared_input_shape": (None if declared is None else
                                                  [d if isinstance(d, int) else str(d or "?") for d in declared]),
                         "reason": layout_reason},
        "input_range": {"range": request.input_range, "scale": request.scale},
        "output": {"kind": output_kind, "requested": request.output, "attacked_as": attacked_as,
                   "name": out_name, "available": out_names if out_names and len(out_names) > 1 else None,
                   "reason": kind_reason if out_name is None else f"{out_reason}; {kind_reason}"},
        "batch_size": _batch_entry(info),
        "class_map": (None if mapping is None else
                      {"file": request.map_source, "model_to_dataset": list(mapping),
                       "identity": list(mapping) == list(range(len(mapping)))}),
        "class_names": (None if names is None else
                        {"file": request.names_source, "names": list(names),
                         "dataset_names": request.dataset_classes}),
        "pipeline": _pipeline(request, info, layout, out_name, out_names, output_kind),
    }
