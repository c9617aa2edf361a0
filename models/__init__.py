from models.build import build_model
from models.crossformer import CrossFormer

__all__ = ["build_model", "CrossFormer"]
