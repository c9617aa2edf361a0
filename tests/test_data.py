"""data/: datasets, transforms, samplers, loaders and their errors, on tiny images in tmp_path."""
from __future__ import annotations

import os
import random
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from config import UserError, get_default_config, load_config
from data import UnreadableImageError, build_loader
from data import digits as digits_module
from data.build import ShardSampler, build_transform
from data.digits import ensure_digits_folder

CLASSES = ("ant", "bee", "cat")
NO_AUG = ["AUG.MIXUP", 0.0, "AUG.CUTMIX", 0.0, "AUG.AUTO_AUGMENT", "none", "AUG.REPROB", 0.0,
          "AUG.COLOR_JITTER", 0.0]


def make_config(data_path, *opts, frozen: bool = True):
    """Small defaults (3 classes, 32-pixel images, batch 2, no workers), then ``opts`` pairs."""
    config = get_default_config()
    config.merge_from_list(["DATA.DATA_PATH", str(data_path), "DATA.IMG_SIZE", 32,
                            "DATA.BATCH_SIZE", 2, "DATA.NUM_WORKERS", 0, "MODEL.NUM_CLASSES", 3,
                            *opts])
    if frozen:
        config.freeze()
    return config


def write_split(root, split: str, per_class: int, classes=CLASSES, seed: int = 0) -> list:
    """``root/split/<class>/<n>.png`` random 40×36 RGB images; their (path, class index) list."""
    rng = np.random.default_rng(seed)
    written = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, split, name)
        os.makedirs(folder)
        for n in range(per_class):
            path = os.path.join(folder, f"{n}.png")
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)
            written.append((path, label))
    return written


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_split(root, "train", 4)
    write_split(root, "val", 2, seed=1)
    return root


def zip_split(root, split: str, archive_split: str = "") -> None:
    """``root/<split>.zip`` and its map, holding the images of the ``root/split`` folder."""
    archive_split = archive_split or split
    split_dir = os.path.join(root, split)
    with zipfile.ZipFile(os.path.join(root, f"{archive_split}.zip"), "w") as archive, \
            open(os.path.join(root, f"{archive_split}_map.txt"), "w") as map_file:
        for label, name in enumerate(sorted(os.listdir(split_dir))):
            for file_name in sorted(os.listdir(os.path.join(split_dir, name))):
                archive.write(os.path.join(split_dir, name, file_name), f"{name}/{file_name}")
                map_file.write(f"{name}/{file_name}\t{label}\n")


# ----------------------------------------------------------------------------- image folders

def test_folder_dataset_builds_loaders(folder):
    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(
        make_config(folder, *NO_AUG))
    assert (len(dataset_train), len(dataset_val)) == (12, 6)
    assert dataset_train.classes == list(CLASSES)
    images, labels = next(iter(loader_train))
    assert images.shape == (2, 3, 32, 32) and labels.dtype == torch.int64
    assert len(loader_train) == 6 and len(loader_val) == 3
    assert mixup_fn is None


def test_config_from_yaml_and_mixup(folder, tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(f"DATA:\n  DATA_PATH: {folder}\n  IMG_SIZE: 32\n  BATCH_SIZE: 4\n"
                        f"  NUM_WORKERS: 0\nMODEL:\n  NUM_CLASSES: 3\n")
    *_, loader_train, _, mixup_fn = build_loader(load_config(str(cfg_file)))
    images, labels = next(iter(loader_train))
    mixed_images, soft_targets = mixup_fn(images, labels)
    assert soft_targets.shape == (4, 3)
    assert torch.allclose(soft_targets.sum(1), torch.ones(4))


def test_odd_batch_with_mixup_is_rejected(folder):
    with pytest.raises(UserError, match="even DATA.BATCH_SIZE, got 3"):
        build_loader(make_config(folder, "DATA.BATCH_SIZE", 3))


def test_class_count_mismatch_names_both_numbers_and_folder(folder):
    with pytest.raises(UserError) as caught:
        build_loader(make_config(folder, *NO_AUG, "MODEL.NUM_CLASSES", 5))
    message = str(caught.value)
    assert "3 classes" in message and "NUM_CLASSES is 5" in message and str(folder) in message


def test_missing_data_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=str(missing)):
        build_loader(make_config(missing, *NO_AUG))


def test_missing_val_split_is_named(tmp_path):
    write_split(tmp_path, "train", 2)
    with pytest.raises(UserError, match=str(tmp_path / "val")):
        build_loader(make_config(tmp_path, *NO_AUG))


@pytest.mark.parametrize("with_class_folders", [True, False])
def test_empty_split_is_named(tmp_path, with_class_folders):
    write_split(tmp_path, "train", 2)
    for name in CLASSES if with_class_folders else ():
        os.makedirs(tmp_path / "val" / name)
    os.makedirs(tmp_path / "val", exist_ok=True)
    with pytest.raises(UserError, match=f"no images in {tmp_path / 'val'}"):
        build_loader(make_config(tmp_path, *NO_AUG))


def test_validation_folder_is_accepted(folder):
    os.rename(folder / "val", folder / "validation")
    _, dataset_val, *_ = build_loader(make_config(folder, *NO_AUG))
    assert dataset_val.root == str(folder / "validation") and len(dataset_val) == 6


def test_train_and_val_class_folders_must_match(tmp_path):
    write_split(tmp_path, "train", 2)
    write_split(tmp_path, "val", 1, classes=("ant", "bee", "dog"))
    with pytest.raises(UserError, match=r"only in train \['cat'\], only in val \['dog'\]"):
        build_loader(make_config(tmp_path, *NO_AUG))


def test_unknown_dataset_lists_known_ones(folder):
    with pytest.raises(UserError, match="known: imagenet, digits, fake"):
        build_loader(make_config(folder, "DATA.DATASET", "cifar"))


def test_batch_larger_than_train_set(folder):
    with pytest.raises(UserError) as caught:
        build_loader(make_config(folder, *NO_AUG, "DATA.BATCH_SIZE", 8), rank=0, world_size=2)
    assert "DATA.BATCH_SIZE 8" in str(caught.value) and "(12 images, 2 processes)" in str(
        caught.value)


# ----------------------------------------------------------------------------- zip archives

@pytest.mark.parametrize("cache_mode", ["no", "full", "part"])
def test_zip_mode_matches_folder_mode(folder, cache_mode):
    zip_split(folder, "train")
    zip_split(folder, "val", archive_split="validation")
    eval_transform = build_transform(False, make_config(folder))
    from_folder = build_loader(make_config(folder, *NO_AUG))[:2]
    from_zip = build_loader(make_config(folder, *NO_AUG, "DATA.ZIP_MODE", True,
                                        "DATA.CACHE_MODE", cache_mode), rank=1, world_size=2)[:2]
    for folder_dataset, zip_dataset in zip(from_folder, from_zip):
        folder_dataset.transform = zip_dataset.transform = eval_transform
        assert len(folder_dataset) == len(zip_dataset)
        for index in range(len(folder_dataset)):
            folder_image, folder_label = folder_dataset[index]
            zip_image, zip_label = zip_dataset[index]
            assert folder_label == zip_label
            assert torch.equal(folder_image, zip_image)
    cached = {"no": [], "full": list(range(12)), "part": [1, 3, 5, 7, 9, 11]}[cache_mode]
    assert sorted(from_zip[0]._cache) == cached


def test_zip_malformed_map_line_names_file_and_line(folder):
    zip_split(folder, "train")
    zip_split(folder, "val")
    map_path = folder / "val_map.txt"
    lines = map_path.read_text().splitlines()
    lines[1] = lines[1].replace("\t", " ")
    map_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"{map_path} line 2: expected"):
        build_loader(make_config(folder, *NO_AUG, "DATA.ZIP_MODE", True))


@pytest.mark.parametrize("missing", ["train.zip", "val_map.txt"])
def test_zip_missing_file_is_named(folder, missing):
    zip_split(folder, "train")
    zip_split(folder, "val")
    os.remove(folder / missing)
    with pytest.raises(UserError, match=f"not found: {folder / missing}"):
        build_loader(make_config(folder, *NO_AUG, "DATA.ZIP_MODE", True))


def test_zip_class_count_is_max_index_plus_one(folder):
    zip_split(folder, "train")
    zip_split(folder, "val")
    with pytest.raises(UserError, match="has 3 classes but MODEL.NUM_CLASSES is 4"):
        build_loader(make_config(folder, *NO_AUG, "DATA.ZIP_MODE", True, "MODEL.NUM_CLASSES", 4))


# ----------------------------------------------------------------------------- unreadable images

@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_stops_the_loader_naming_the_file(folder, num_workers):
    bad_path = folder / "val" / "bee" / "1.png"
    bad_path.write_bytes(b"not a png at all")
    *_, loader_val, _ = build_loader(make_config(folder, *NO_AUG, "DATA.NUM_WORKERS",
                                                 num_workers))
    with pytest.raises(UnreadableImageError) as caught:
        list(loader_val)
    assert isinstance(caught.value, UserError)
    assert str(caught.value).startswith(f"cannot read image {bad_path}: cannot identify image")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_in_zip_names_archive_and_entry(folder, num_workers):
    (folder / "val" / "cat" / "0.png").write_bytes(b"\x89PNG truncated")
    zip_split(folder, "train")
    zip_split(folder, "val")
    *_, loader_val, _ = build_loader(make_config(
        folder, *NO_AUG, "DATA.ZIP_MODE", True, "DATA.CACHE_MODE", "no", "DATA.NUM_WORKERS",
        num_workers))
    with pytest.raises(UnreadableImageError, match=f"^cannot read image {folder / 'val.zip'}"
                                                   f"@/cat/0.png: [^\n]+$"):
        list(loader_val)


# ----------------------------------------------------------------------------- digits

def test_digits_written_once_then_reused(tmp_path):
    root = tmp_path / "digits"
    root.mkdir()  # the digits are written only into an existing folder
    config = make_config(root, *NO_AUG, "DATA.DATASET", "digits", "MODEL.NUM_CLASSES", 10)
    dataset_train, dataset_val, *_ = build_loader(config)
    assert dataset_train.classes == [str(digit) for digit in range(10)]
    assert (len(dataset_train), len(dataset_val)) == (1437, 360)
    per_class = np.bincount(load_digits().target, minlength=10)
    val_counts = np.bincount(dataset_val.targets, minlength=10)
    assert np.array_equal(np.bincount(dataset_train.targets, minlength=10) + val_counts, per_class)
    assert np.all(np.abs(val_counts - 0.2 * per_class) < 1)  # stratified 80/20
    sample_file = dataset_val.samples[0][0]
    with Image.open(sample_file) as image:
        assert image.size == (32, 32)
    assert dataset_val[0][0].shape == (3, 32, 32)
    before = os.stat(sample_file).st_mtime_ns, os.stat(root).st_ino
    build_loader(config)
    assert (os.stat(sample_file).st_mtime_ns, os.stat(root).st_ino) == before
    assert os.listdir(tmp_path) == ["digits"]


def test_digits_process_losing_the_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    root = tmp_path / "digits"
    real_rename = os.rename

    def rival_finishes_first(source, target):
        os.makedirs(os.path.join(target, "train", "written-by-rival"))
        real_rename(source, target)

    monkeypatch.setattr(digits_module.os, "rename", rival_finishes_first)
    assert ensure_digits_folder(str(root)) == str(root)
    assert os.listdir(root / "train") == ["written-by-rival"]
    assert os.listdir(tmp_path) == ["digits"]


# ----------------------------------------------------------------------------- fake data

def test_fake_dataset():
    config = make_config("", "DATA.DATASET", "fake", "DATA.FAKE_SIZE", 16, "DATA.BATCH_SIZE", 8,
                         "MODEL.NUM_CLASSES", 7)
    dataset_train, dataset_val, loader_train, _, _ = build_loader(config)
    assert (len(dataset_train), len(dataset_val)) == (16, 8)
    images, labels = next(iter(loader_train))
    assert images.shape == (8, 3, 32, 32) and int(labels.max()) < 7
    dataset_train.transform = dataset_val.transform
    assert torch.equal(dataset_train[0][0], dataset_train[0][0])
    assert not torch.equal(dataset_train[0][0], dataset_val[0][0])


# ----------------------------------------------------------------------------- samplers

@pytest.mark.parametrize("dataset_size,world_size", [(7, 2), (8, 2), (10, 3), (1, 2)])
def test_shard_sampler_covers_every_index_once(dataset_size, world_size):
    shards = [list(ShardSampler(dataset_size, rank, world_size)) for rank in range(world_size)]
    everything = sorted(index for shard in shards for index in shard)
    assert everything == list(range(dataset_size))
    assert [len(ShardSampler(dataset_size, rank, world_size)) for rank in range(world_size)] == [
        len(shard) for shard in shards]


def test_val_loaders_over_two_ranks_see_each_image_once(tmp_path):
    classes = ("a", "b", "c", "d", "e")
    write_split(tmp_path, "train", 2, classes=classes)
    write_split(tmp_path, "val", 1, classes=classes)
    seen = []
    for rank in range(2):
        *_, loader_val, _ = build_loader(make_config(tmp_path, *NO_AUG, "MODEL.NUM_CLASSES", 5),
                                         rank=rank, world_size=2)
        seen += [int(label) for _, labels in loader_val for label in labels]
    assert sorted(seen) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- transforms

def test_small_train_transform_starts_with_random_crop(folder):
    first = build_transform(True, make_config(folder)).transforms[0]
    assert isinstance(first, transforms.RandomCrop)
    assert first.padding == 4 and first.size == (32, 32)
    large = build_transform(True, make_config(folder, "DATA.IMG_SIZE", 224)).transforms[0]
    assert isinstance(large, RandomResizedCropAndInterpolation)


def test_horizontal_flip_follows_aug_hflip(folder):
    config = make_config(folder, frozen=False)
    assert any(isinstance(step, transforms.RandomHorizontalFlip)
               for step in build_transform(True, config).transforms)
    config.AUG.HFLIP = 0.0
    assert not any(isinstance(step, transforms.RandomHorizontalFlip)
                   for step in build_transform(True, config).transforms)


@pytest.mark.parametrize("crop", [True, False])
def test_eval_transform_resizes_then_crops_or_squashes(folder, crop):
    config = make_config(folder, "DATA.IMG_SIZE", 224, "TEST.CROP", crop)
    steps = build_transform(False, config).transforms
    assert isinstance(steps[0], transforms.Resize)
    assert steps[0].size == (256 if crop else (224, 224))
    assert isinstance(steps[1], transforms.CenterCrop) == crop
    image = Image.new("RGB", (300, 200))
    assert build_transform(False, config)(image).shape == (3, 224, 224)


# ----------------------------------------------------------------------------- reproducibility

def test_epoch_follows_seed_and_epoch_only_and_resumes_at_any_batch(folder):
    """Each sample's augmentation (random crop, RandAugment, erasing: Python, NumPy and torch
    RNGs) comes from (SEED, epoch, index): the same batches with or without workers, whatever
    torch's global RNG, and a sampler started at batch 1 gives exactly the epoch's rest."""

    def one_epoch(seed: int, workers: int, start_batch: int = 0, torch_seed: int = 0) -> list:
        *_, loader_train, _, _ = build_loader(make_config(folder, "SEED", seed, "DATA.NUM_WORKERS", workers,
                                                          "DATA.BATCH_SIZE", 4, "AUG.MIXUP", 0.0, "AUG.CUTMIX", 0.0,
                                                          "AUG.REPROB", 0.5))
        torch.manual_seed(torch_seed)
        loader_train.sampler.set_epoch(3, start_batch * 4)
        assert len(loader_train) == 3 - start_batch
        return list(loader_train)

    def same(first: list, second: list) -> bool:
        return len(first) == len(second) and all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))

    full = one_epoch(0, 0)
    assert len(full) == 3
    assert same(full, one_epoch(0, 2, torch_seed=5))
    assert same(full[1:], one_epoch(0, 2, start_batch=1))
    assert not same(full, one_epoch(1, 0))


def test_official_randaugment_runs_on_thousands_of_images():
    """The official recipe (rand-m9-mstd0.5-inc1) draws posterize with 0 bits on ~0.2% of images;
    some Pillow versions refuse that (requirements.txt keeps one that does not)."""
    config = get_default_config()
    config.merge_from_list(["DATA.IMG_SIZE", 32, "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1"])
    transform = build_transform(True, config)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    random.seed(0)
    for _ in range(4000):
        image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert transform(image).shape == (3, 32, 32)
