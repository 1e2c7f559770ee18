"""Stage 1, models: a file or zoo name in, a `LoadedModel` out.

`load_model` checks the file and flags, picks the format (`formats`: .pt2, TorchScript,
state_dict/checkpoint, safetensors, ONNX via `onnx_support`, pickles on opt-in; zoo names
via `zoo`), reads it, infers the architecture from weights when needed (`arch_inference`,
`architectures`, `architectures_dm`) and builds the [0,1]-NCHW-in, logits-out boundary
(`adapters`, `boundary_modules`), whose decisions `adaptations` records.
"""

from robaudit.audit.models.loading import LoadedModel, load_model, save_export

__all__ = ["LoadedModel", "load_model", "save_export"]
