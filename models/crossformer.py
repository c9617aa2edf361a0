"""The authors' model module, ``from models.crossformer import CrossFormer`` as their API document
writes it: the classes of ``crossformer/model.py``, which take the authors' constructor arguments
and forward on their tensor layouts (see docs/models.md)."""
from crossformer.model import (Attention, CrossFormer, CrossFormerBlock, DynamicPosBias, Mlp, PatchEmbed,
                               PatchMerging, Stage)

__all__ = ["Attention", "CrossFormer", "CrossFormerBlock", "DynamicPosBias", "Mlp", "PatchEmbed", "PatchMerging",
           "Stage"]
