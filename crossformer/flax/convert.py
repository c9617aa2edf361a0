"""Weights between the PyTorch model and the Flax one, by name.

A PyTorch key ``layers.0.blocks.1.attn.qkv.weight`` is the Flax path
``('layers', 0, 'blocks', 1, 'attn', 'qkv', 'kernel')``; the array changes by its rank:

* 4-D conv weight ``(O, I, kH, kW)`` -> kernel ``(kH, kW, I, O)``;
* 2-D linear weight ``(out, in)`` -> kernel ``(in, out)``;
* 1-D LayerNorm weight -> ``scale``; biases and ``absolute_pos_embed`` unchanged.

The DPB's ``nn.Sequential`` entries ``pos1.0`` / ``pos1.2`` are named ``pos1.norm`` / ``pos1.fc``.
Checkpoints of the ICLR code also hold the derivable ``attn.biases`` and
``attn.relative_position_index`` tables; they are dropped.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from crossformer.flax.model import CrossFormer
from crossformer.official import drop_derivable_buffers

_DPB_LAYERS = ("pos1", "pos2", "pos3")
_DPB_ENTRIES = {"0": "norm", "2": "fc"}


def _flax_path(key: str, rank: int) -> tuple:
    parts = key.split(".")
    path: list = []
    for i, part in enumerate(parts[:-1]):
        if i and parts[i - 1] in _DPB_LAYERS:
            path.append(_DPB_ENTRIES[part])
        else:
            path.append(int(part) if part.isdigit() else part)
    leaf = parts[-1]
    if leaf == "weight":
        leaf = "scale" if rank == 1 else "kernel"
    return (*path, leaf)


def _torch_key(path: tuple) -> str:
    parts = []
    for i, part in enumerate(path[:-1]):
        if i and path[i - 1] in _DPB_LAYERS:
            parts.append({name: index for index, name in _DPB_ENTRIES.items()}[part])
        else:
            parts.append(str(part))
    leaf = path[-1]
    return ".".join(parts + ["weight" if leaf in ("kernel", "scale") else leaf])


def _to_flax_array(key: str, value: np.ndarray) -> np.ndarray:
    if key.endswith(".weight") and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if key.endswith(".weight") and value.ndim == 2:
        return value.T
    return value


def _to_torch_array(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict:
    """A PyTorch CrossFormer state dict (ours or an official one; tensors or arrays) -> nested
    dict of float arrays with the Flax parameter layout (integer keys for list entries)."""
    params: dict = {}
    for key, value in drop_derivable_buffers(dict(state_dict)).items():
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        node = params
        path = _flax_path(key, array.ndim)
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(_to_flax_array(key, array))
    return params


def flax_to_torch(params: Mapping) -> dict:
    """Inverse of :func:`torch_to_flax`: nested Flax parameters -> PyTorch state dict (tensors)."""
    import torch  # only this direction needs PyTorch

    state = {}
    for path, value in _flatten(params):
        array = np.ascontiguousarray(_to_torch_array(path, np.asarray(value)))
        state[_torch_key(path)] = torch.from_numpy(array.copy())
    return state


def _flatten(tree: Mapping, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    items = []
    for name, value in tree.items():
        if isinstance(value, Mapping):
            items += _flatten(value, prefix + (name,))
        else:
            items.append((prefix + (name,), value))
    return items


def model_params(model: nnx.Module) -> dict:
    """The parameters of a Flax model as a nested dict of arrays (the layout of :func:`torch_to_flax`)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> None:
    """Put PyTorch weights into a Flax model, in place; every parameter must be given, with its shape."""
    params = torch_to_flax(state_dict)
    expected = dict(_flatten(model_params(model)))
    given = dict(_flatten(params))
    missing = sorted(_torch_key(p) for p in expected.keys() - given.keys())
    unexpected = sorted(_torch_key(p) for p in given.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for path, value in given.items():
        if value.shape != expected[path].shape:
            raise ValueError(f"{_torch_key(path)}: shape {tuple(value.shape)} for Flax {tuple(expected[path].shape)}")
    for path, value in given.items():  # e.g. a half-precision checkpoint into a float32 model
        node = params
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value.astype(expected[path].dtype, copy=False)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def from_torch(state_dict: Mapping[str, Any], seed: int = 0, **model_kwargs: Any) -> CrossFormer:
    """A Flax :class:`CrossFormer` (``model_kwargs``: the PyTorch constructor arguments) holding the
    weights of ``state_dict``, in eval mode. Built abstractly, so no time goes into a random init
    that would be overwritten; ``seed`` seeds the dropout stream for training."""
    model = nnx.eval_shape(lambda: CrossFormer(**model_kwargs, rngs=nnx.Rngs(params=seed, dropout=seed)))
    nnx.reseed(model, dropout=seed)
    load_torch_state_dict(model, state_dict)
    model.eval()
    return model
