"""Packaging: the dependency lists agree (pyproject.toml's dependencies and its ``export`` extra
state the same version ranges as requirements.txt and requirements-export.txt, which .ci/run tests
at their floors, and the test requirements include the export ones), and ``pip install .`` gives
an importable ``crossformer`` (slow)."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from conftest import TIMEOUT_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENT = re.compile(r"([A-Za-z0-9_.-]+)\s*([<>=!~].*)")


def ranges(lines) -> dict[str, str]:
    """``{name: version range}`` of requirement lines (comments, blank lines and ``-r`` skipped)."""
    found = {}
    for line in lines:
        match = REQUIREMENT.fullmatch(line.split("#")[0].strip())
        if match:
            found[match.group(1).lower()] = match.group(2).replace(" ", "")
    return found


def requirement_file(name: str) -> list[str]:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read().splitlines()


def test_pyproject_states_the_ranges_of_the_requirement_files():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    runtime = ranges(requirement_file("requirements.txt"))
    dependencies = ranges(project["dependencies"])
    assert set(dependencies) == {"torch", "timm"}
    assert dependencies == {name: runtime[name] for name in dependencies}
    export = ranges(requirement_file("requirements-export.txt"))
    assert set(export) == {"onnx", "onnxscript", "onnxruntime"}
    assert ranges(project["optional-dependencies"]["export"]) == export
    assert {"-r requirements.txt", "-r requirements-export.txt"} <= set(requirement_file("requirements-test.txt"))


@pytest.mark.slow
def test_pip_install_then_import_from_another_folder(tmp_path):
    """``pip install .`` into a fresh virtual environment (reusing this one's torch and timm)
    installs ``crossformer`` and nothing with a generic name; it imports from another folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "crossformer"), source / "crossformer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for family in ("crossformer", "crossformer_pp"):  # the official configs, installed as package data
        shutil.copytree(os.path.join(REPO, "configs", family), source / "configs" / family)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages (pip, setuptools, torch, timm) seen from the new one, without pip of its own;
    # --system-site-packages would reach only the base interpreter's when the tests run in a venv (as in CI)
    with open(os.path.join(site, "tested_environment.pth"), "w") as f:
        f.write("\n".join(sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})) + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(source)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    installed = {name.split("-")[0] for name in os.listdir(site) if not name.startswith(("_", "."))}
    assert "crossformer" in installed
    assert not installed & {"models", "data", "utils", "config", "logger", "runtime", "main", "optimizer"}
    away = tmp_path / "elsewhere"
    away.mkdir()
    code = ("import crossformer, torch; "
            "m = crossformer.CrossFormer(img_size=32, patch_size=[4, 8], embed_dim=32, depths=[1, 1, 1, 1], "
            "num_heads=[2, 4, 8, 16], group_size=[4, 4, 4, 4], interval=[2, 1, 1, 1], num_classes=10).eval(); "
            "print(crossformer.__file__); print(tuple(m(torch.randn(2, 3, 32, 32)).shape)); "
            "import timm; print(len(timm.list_models('crossformer*')), "
            "timm.create_model('crossformer_pp_huge_patch4_group_const_224', pretrained=False).num_features)")
    result = subprocess.run([python, "-c", code], cwd=away, capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    location, shape, registry = result.stdout.strip().splitlines()
    assert location.startswith(site) and shape == "(2, 10)" and registry == "8 1024"
