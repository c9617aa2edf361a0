import os
import sys

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (much faster for small models on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread_in_process(one_thread, monkeypatch):
    """One thread also through main.run in this process: OMP_NUM_THREADS is the user's choice,
    which runtime leaves alone, so it does not change pytest's thread count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
