"""The dependency lists agree: pyproject.toml's dependencies and its ``export`` extra state the
same version ranges as requirements.txt and requirements-export.txt (which .ci/run tests at their
floors), and the test requirements include the export ones."""
import os
import re
import tomllib

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
