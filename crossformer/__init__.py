"""CrossFormer and CrossFormer++: the model, importable on its own (``pip install .``)."""
from crossformer.model import CrossFormer

__all__ = ["CrossFormer"]
