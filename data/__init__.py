"""Data pipeline: datasets, transforms, samplers and loaders built from the config."""
from data.build import build_dataset, build_loader, build_transform
from data.images import UnreadableImageError

__all__ = ["build_dataset", "build_loader", "build_transform", "UnreadableImageError"]
