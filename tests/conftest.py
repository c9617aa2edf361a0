import os
import signal
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


def deterministic_algorithms() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.fixture(autouse=True)
def trainer_flags_restored():
    """The trainers run in-process by tests set torch's cuDNN and determinism flags for their
    process (runtime.setup_run); put them back after each test."""
    benchmark, deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    algorithms = deterministic_algorithms()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    if deterministic_algorithms() != algorithms:
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])  # (imports torch._dynamo)


# Environment variables set by pytest for each test and by scikit-learn when first imported
# (data/digits.py), and those that torch's compiler stack records on first use (cache folders, ...)
UNCHECKED_VARIABLES = {"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"}
UNCHECKED_PREFIXES = ("TORCHINDUCTOR_", "_TORCHINDUCTOR_", "TRITON_")
# torch's config modules, compared where they were imported before the test module started
TORCH_CONFIG_MODULES = ("torch._dynamo.config", "torch._inductor.config", "torch._functorch.config",
                        "torch.fx.experimental._config")


def process_state() -> dict:
    """What a test can change for the rest of the pytest process (it runs every test module)."""
    state = {
        "environment": {k: v for k, v in os.environ.items()
                        if k not in UNCHECKED_VARIABLES and not k.startswith(UNCHECKED_PREFIXES)},
        "working directory": os.getcwd(),
        "torch threads": torch.get_num_threads(),
        "default dtype": torch.get_default_dtype(),
        "deterministic algorithms": deterministic_algorithms(),
        "cudnn flags": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        # the stop signals main.py handles (SIGCHLD is left out: torch's DataLoader sets it once for good)
        "signal handlers": {s.name: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
    }
    for name in TORCH_CONFIG_MODULES:
        if name in sys.modules:
            state[name] = sys.modules[name].get_config_copy()
    return state


def changed_entries(before: dict, after: dict) -> list[str]:
    """The keys of ``before`` whose values differ in ``after``, one level down for dictionaries
    (which variable, which option)."""
    changed = []
    for key in before:
        old, new = before[key], after.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}: {name}" for name in sorted(old.keys() | new.keys())
                        if name not in old or name not in new or old[name] != new[name]]
        else:
            changed.append(key)
    return sorted(changed)


@pytest.fixture(scope="module", autouse=True)
def process_state_kept():
    """Fails a test module that leaves the process changed for the modules after it. Put changes
    back with monkeypatch.setenv/delenv, a fixture, or torch's own ``config.patch`` for torch's
    config modules: monkeypatch.setattr on one of those undoes with ``delattr`` (pytest 9.2),
    which removes the option for the rest of the session."""
    before = process_state()
    yield
    changed = changed_entries(before, process_state())
    if changed:
        pytest.fail("the test module left process-wide state changed: " + "; ".join(changed), pytrace=False)
