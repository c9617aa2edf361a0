"""Data pipeline: datasets, transforms, samplers and loaders built from the config."""
from data.build import build_loader
from data.images import UnreadableImageError

__all__ = ["build_loader", "UnreadableImageError"]
