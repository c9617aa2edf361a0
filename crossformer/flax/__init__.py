"""CrossFormer / CrossFormer++ in Flax NNX, with weights converted from the PyTorch model.

Needs ``jax`` and ``flax`` (requirements-jax.txt); nothing in the PyTorch code imports this package.
"""
from crossformer.flax.convert import flax_to_torch, from_torch, load_torch_state_dict, model_params, torch_to_flax
from crossformer.flax.model import CrossFormer

__all__ = ["CrossFormer", "flax_to_torch", "from_torch", "load_torch_state_dict", "model_params", "torch_to_flax"]
