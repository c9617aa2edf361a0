"""``build_loader``, ``build_dataset``, ``build_transform`` (the authors' names): datasets,
transforms, samplers, loaders and Mixup/CutMix from the config."""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import FakeData
from yacs.config import CfgNode

from config import UserError
from data.digits import ensure_digits_folder
from data.folder import build_folder_dataset, check_data_path, find_val_split
from data.resumable import loader_options, resumable_loader
from data.zip_dataset import ZipImageDataset

DATASETS = ("imagenet", "digits", "fake")
SMALL_IMAGE_SIZE = 32  # at or below: CIFAR-style pad-and-crop instead of resizing crops
FAKE_VAL_OFFSET = 1_000_000  # FakeData seeds image i with i + offset: val never repeats train


def build_transform(is_train: bool, config: CfgNode) -> Callable:
    """The train (timm augmentation) or eval (resize, crop, normalize) transform of PIL images."""
    size = config.DATA.IMG_SIZE
    if is_train:
        transform = create_transform(
            input_size=size,
            is_training=True,
            hflip=config.AUG.HFLIP,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=None if config.AUG.AUTO_AUGMENT == "none" else config.AUG.AUTO_AUGMENT,
            re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE,
            re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
        )
        if size <= SMALL_IMAGE_SIZE:
            transform.transforms[0] = transforms.RandomCrop(size, padding=4)
        return transform
    interpolation = str_to_interp_mode(
        "bicubic" if config.DATA.INTERPOLATION == "random" else config.DATA.INTERPOLATION)
    if size > SMALL_IMAGE_SIZE and config.TEST.CROP:
        resize = [transforms.Resize(int(256 / 224 * size), interpolation=interpolation),
                  transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=interpolation)]
    return transforms.Compose(resize + [
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def _check_labels(dataset_train: Dataset, dataset_val: Dataset, where: str,
                  config: CfgNode) -> None:
    if hasattr(dataset_train, "classes"):  # image folders: class names from the folder names
        if dataset_train.classes != dataset_val.classes:
            only_train = sorted(set(dataset_train.classes) - set(dataset_val.classes))
            only_val = sorted(set(dataset_val.classes) - set(dataset_train.classes))
            raise UserError(f"train and val class folders differ in {where}: only in train "
                            f"{only_train[:5]}, only in val {only_val[:5]}")
    num_classes = max(class_count(dataset_train, config), class_count(dataset_val, config))
    if num_classes != config.MODEL.NUM_CLASSES:
        raise UserError(f"the dataset in {where} has {num_classes} classes but "
                        f"MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES}")


def class_count(dataset: Dataset, config: CfgNode) -> int:
    """Classes of a dataset: its class folders, one more than the largest class index of a zip
    map, or MODEL.NUM_CLASSES for the fake dataset (which draws labels from that many)."""
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    if hasattr(dataset, "targets"):
        return max(dataset.targets) + 1
    return config.MODEL.NUM_CLASSES


def _dataset_root(config: CfgNode) -> str:
    """The folder holding the splits of DATA.DATASET (the digits are written there first)."""
    root = config.DATA.DATA_PATH
    if config.DATA.DATASET == "digits":
        if root and not os.path.isdir(root):  # a typo must not become a new folder of digits
            raise UserError(f"dataset folder not found: {root} (the digits are written only into an existing "
                            "folder; leave --data-path out to use ~/.cache/crossformer/digits)")
        root = ensure_digits_folder(root)
    check_data_path(root)
    return root


def process_share(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """``(rank, world_size)`` as given, else the process group's (as the authors' code read them),
    else 0 and 1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_dataset(is_train: bool, config: CfgNode, rank: Optional[int] = None,
                  world_size: Optional[int] = None) -> tuple[Dataset, int]:
    """``(dataset, nb_classes)``: the train or val split of DATA.DATASET with its transform (zip
    archives when DATA.ZIP_MODE; with cache mode ``part`` each rank caches its share, see
    ``process_share``), and its class count (see ``class_count``)."""
    rank, world_size = process_share(rank, world_size)
    name = config.DATA.DATASET
    if name not in DATASETS:
        raise UserError(f"unknown DATA.DATASET {name!r}; known: {', '.join(DATASETS)}")
    transform = build_transform(is_train, config)
    if name == "fake":
        image_size = (3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
        size = config.DATA.FAKE_SIZE if is_train else max(config.DATA.FAKE_SIZE // 4, config.DATA.BATCH_SIZE)
        dataset = FakeData(size, image_size, config.MODEL.NUM_CLASSES, transform,
                           random_offset=0 if is_train else FAKE_VAL_OFFSET)
        return dataset, class_count(dataset, config)
    root = _dataset_root(config)
    if config.DATA.ZIP_MODE:
        split = "train" if is_train else find_val_split(root, ".zip")
        dataset = ZipImageDataset(os.path.join(root, f"{split}.zip"), os.path.join(root, f"{split}_map.txt"),
                                  transform, config.DATA.CACHE_MODE, rank, world_size)
    else:
        dataset = build_folder_dataset(root, "train" if is_train else find_val_split(root), transform)
    return dataset, class_count(dataset, config)


def build_datasets(config: CfgNode, rank: int = 0, world_size: int = 1) -> tuple[Dataset, Dataset]:
    """Train and val datasets of DATA.DATASET, checked to have the same classes, MODEL.NUM_CLASSES of them."""
    dataset_train, _ = build_dataset(True, config, rank, world_size)
    dataset_val, _ = build_dataset(False, config, rank, world_size)
    if config.DATA.DATASET != "fake":
        _check_labels(dataset_train, dataset_val, _dataset_root(config), config)
    return dataset_train, dataset_val


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``world_size`` gets indices ``r, r + world_size, ...``, in order.

    Every index goes to exactly one rank, with no padding, so validation counts each image once.
    """

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_mixup(config: CfgNode) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when AUG turns both off."""
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0 and aug.CUTMIX_MINMAX is None:
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise UserError(f"Mixup/CutMix needs an even DATA.BATCH_SIZE, "
                        f"got {config.DATA.BATCH_SIZE}")
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING,
                 num_classes=config.MODEL.NUM_CLASSES)


def build_loader(config: CfgNode, rank: Optional[int] = None, world_size: Optional[int] = None
                 ) -> tuple[Dataset, Dataset, DataLoader, DataLoader, Optional[Mixup]]:
    """``(dataset_train, dataset_val, loader_train, loader_val, mixup_fn)`` for this rank
    (``rank``/``world_size``: see ``process_share``).

    The train loader shuffles with a ResumableSampler seeded by config.SEED (call its
    ``set_epoch(epoch, start)`` each epoch; ``start`` skips samples a step checkpoint already
    trained) and drops the last partial batch; each sample's augmentation is seeded from
    (SEED, epoch, index), whichever worker loads it. The val loader gives each rank its
    ShardSampler share. Workers ignore the stop signals (the main process stops them). An
    unreadable image raises ``UnreadableImageError`` (a UserError whose one-line message names
    the file) from iterating either loader, with or without workers.
    """
    rank, world_size = process_share(rank, world_size)
    dataset_train, dataset_val = build_datasets(config, rank, world_size)
    loader_train = resumable_loader(dataset_train, config, rank, world_size)
    loader_val = DataLoader(dataset_val, sampler=ShardSampler(len(dataset_val), rank, world_size), shuffle=False,
                            drop_last=False, **loader_options(config))
    return dataset_train, dataset_val, loader_train, loader_val, build_mixup(config)
