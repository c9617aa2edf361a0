from crossformer import CrossFormer
from models.build import build_model

__all__ = ["build_model", "CrossFormer"]
