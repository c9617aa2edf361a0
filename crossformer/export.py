"""``export_program``: a ``torch.export`` program of a CrossFormer that accepts any height and width
in a range, for deployment or ONNX (``torch.onnx.export(program, dynamo=True)``).

Why a helper: a stage map can hold a single group at one size (7x7 at 224) and several at the next
(8x8 at 256). Tracing with backed sizes specialises tensor layouts on "this dimension is 1", which
turns into a guard that rejects the other sizes. Exporting with ``backed_size_oblivious`` makes the
tracer treat such dimensions as general sizes; the program is then valid, and checked, at every
size of the range (tests compare it with eager at 224x224, 256x256 and 288x320).
"""
from __future__ import annotations

import torch
from torch import nn


def export_program(model: nn.Module, example: torch.Tensor | None = None, min_size: int = 224,
                   max_size: int = 2048) -> torch.export.ExportedProgram:
    """Export ``model`` (in eval mode) with a dynamic height and width in ``[min_size, max_size]``;
    ``example`` (default: one 3-channel image of ``min_size``) fixes batch and channels. Sizes outside
    the range, or smaller than the model's groups allow, are rejected by the program's checks."""
    if example is None:
        example = torch.randn(1, 3, min_size, min_size)
    height = torch.export.Dim("height", min=min_size, max=max_size)
    width = torch.export.Dim("width", min=min_size, max=max_size)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(model, (example,), dynamic_shapes=({2: height, 3: width},))
