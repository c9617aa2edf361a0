"""Object detection and instance segmentation with CrossFormer backbones on torchvision detectors."""
