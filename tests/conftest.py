import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tests marked slow run only when CROSSFORMER_SLOW_TESTS=1 (CI sets it when its budget allows).
RUN_SLOW = os.environ.get("CROSSFORMER_SLOW_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on 2 CPU cores; run with CROSSFORMER_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set CROSSFORMER_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """The digits image folder, written once per test session (main.py writes it only into an
    existing folder, and no subprocess then races to create it)."""
    from data.digits import ensure_digits_folder

    return ensure_digits_folder(str(tmp_path_factory.mktemp("data") / "digits"))
