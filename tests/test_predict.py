"""predict.py: the classes of held-out digits from a trained run's checkpoint (the same
probabilities as the model on eval-transformed images, in any image mode), and where class names
come from."""
import os
import re

import pytest
import torch
from PIL import Image

import predict
from config import load_config
from conftest import check_ok, run_script
from data.build import build_transform
from data.images import load_image_file
from models import build_model
from utils import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


def test_predict_names_the_classes_of_held_out_digits(four_epoch_run, digits_dir, tmp_path):
    """Two val images per digit (never trained on), one of them saved in another image mode."""
    images, labels = [], []
    for label in range(10):
        folder = os.path.join(digits_dir, "val", str(label))
        for index, name in enumerate(sorted(os.listdir(folder))[:2]):
            path = os.path.join(folder, name)
            if index == 1:  # the same pixels as RGBA, palette or 16-bit: the same classification
                mode = ("RGBA", "P", "I;16", "RGB")[label % 4]
                path = str(tmp_path / f"{label}_{mode.replace(';', '')}.png")
                Image.open(os.path.join(folder, name)).convert(mode).save(path)
            images.append(path)
            labels.append(str(label))
    checkpoint = four_epoch_run.run_dir / "best.pth"
    assert load_checkpoint_file(str(checkpoint))["classes"] == [str(d) for d in range(10)]
    result = run_script("predict.py", "--cfg", four_epoch_run.run_dir / "config.yaml", "--checkpoint", checkpoint,
                        "--device", "cpu", *images)
    check_ok(result)
    printed = {}
    current = None
    for line in result.stdout.splitlines():
        if not line.startswith("  "):
            current = line
            printed[current] = []
        else:
            match = re.fullmatch(r"  (\d)\. +(\d+\.\d\d)%  (\S+)", line)
            assert match, line
            printed[current].append((match.group(3), float(match.group(2))))
    assert list(printed) == images and all(len(rows) == 5 for rows in printed.values()), result.stdout
    correct = sum(printed[path][0][0] == label for path, label in zip(images, labels))
    assert correct >= 16, f"{correct}/20 right: {printed}"

    # exactly the evaluation transform: the same probabilities as the model on eval-transformed images
    config = load_config(str(four_epoch_run.run_dir / "config.yaml"))
    model = build_model(config).eval()
    model.load_state_dict(load_checkpoint_file(str(checkpoint))["model"])
    transform = build_transform(False, config)
    batch = torch.stack([transform(load_image_file(path)) for path in images])
    probabilities, indices = predict.predict(model, batch, 5)
    for path, row_p, row_i in zip(images, probabilities.tolist(), indices.tolist()):
        assert [name for name, _ in printed[path]] == [str(i) for i in row_i]
        assert [p for _, p in printed[path]] == pytest.approx([100 * p for p in row_p], abs=0.006)


def test_class_names_from_checkpoint_imagenet_or_indices():
    assert predict.class_names({"classes": ["cat", "dog"]}, 2) == ["cat", "dog"]
    assert predict.class_names({"classes": ["cat", "dog"]}, 3) == ["0", "1", "2"]  # not this model's
    names = predict.class_names({}, 1000)
    assert len(names) == 1000 and names[0].startswith("tench") and "goldfish" in names[1]
