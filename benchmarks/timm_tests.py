"""timm's own model tests (``tests/test_models.py`` of pytorch-image-models) on our eight names.

Runs that file from a timm checkout against the installed timm, with ``crossformer`` imported
first so that its models are registered when the file lists them; selects the tests of our names,
TorchScript aside, and prints passed / skipped / failed per test function::

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm
    python benchmarks/timm_tests.py /tmp/timm              # exit code 1 when a test fails
    python benchmarks/timm_tests.py /tmp/timm -- -x -v     # arguments after -- go to pytest

The file's forward_intermediates tests list timm's own modules only, so they select none of ours;
``tests/test_timm_models.py`` covers that interface. Takes minutes on a CPU (the largest models).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

import crossformer  # noqa: E402,F401  (registers the eight names before the test file lists models)

SELECTION = "crossformer and not torchscript"


class Outcomes:
    """pytest plugin: the outcome of each test (failed if any phase failed), by test function."""

    def __init__(self) -> None:
        self.by_test: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.by_test[report.nodeid] = "failed"
        elif report.skipped:
            self.by_test.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            self.by_test.setdefault(report.nodeid, "passed")

    def table(self) -> dict[str, collections.Counter]:
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for nodeid, outcome in self.by_test.items():
            counts[nodeid.split("::")[-1].split("[")[0]][outcome] += 1
        return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timm_checkout", help="a checkout of huggingface/pytorch-image-models")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    test_file = os.path.join(args.timm_checkout, "tests", "test_models.py")
    if not os.path.isfile(test_file):
        parser.error(f"{test_file} not found: give the root of a pytorch-image-models checkout")
    import timm
    print(f"timm {timm.__version__} (installed) with {test_file}")
    outcomes = Outcomes()
    # importlib mode: the checkout's own timm package must not shadow the installed one
    exit_code = pytest.main([test_file, "-k", SELECTION, "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                             "-W", "ignore::pytest.PytestUnknownMarkWarning",  # timeout: pytest-timeout's
                             *args.pytest_args], plugins=[outcomes])
    print("test function | passed | skipped | failed")
    for name, counts in sorted(outcomes.table().items()):
        print(f"{name} | {counts['passed']} | {counts['skipped']} | {counts['failed']}")
    return 0 if exit_code == pytest.ExitCode.OK else 1  # none selected (5) fails too


if __name__ == "__main__":
    sys.exit(main())
