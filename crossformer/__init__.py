"""CrossFormer and CrossFormer++: the model, importable on its own (``pip install .``).

Importing the package registers the eight official models with timm (``crossformer.timm_models``).
"""
from crossformer import timm_models
from crossformer.export import export_program
from crossformer.model import CrossFormer

__all__ = ["CrossFormer", "export_program", "timm_models"]
