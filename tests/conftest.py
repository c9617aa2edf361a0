import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

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


def load_dense_fixture(family: str) -> dict:
    """tests/fixtures/{family}_dense_micro.pt (family v1: the ICLR backbone, pp: CrossFormer++'s):
    constructor settings, official state dict, and per case the raw stage maps of one input."""
    return torch.load(os.path.join(FIXTURES, f"{family}_dense_micro.pt"), weights_only=True)


def dense_fixture_opts(fixture: dict, case: dict) -> list[str]:
    """--opts that give a config the fixture's backbone with the case's group sizes and intervals."""
    settings = fixture["config"]
    return ["MODEL.CROS.EMBED_DIM", str(settings["embed_dim"]), "MODEL.CROS.DEPTHS", str(settings["depths"]),
            "MODEL.CROS.NUM_HEADS", str(settings["num_heads"]), "MODEL.CROS.PATCH_SIZE", str(settings["patch_size"]),
            "MODEL.CROS.MERGE_SIZE", str(settings["merge_size"]),
            "MODEL.CROS.MLP_RATIO", str([settings["mlp_ratio"]] * 4),
            "MODEL.CROS.QKV_BIAS", str(settings["qkv_bias"]), "MODEL.CROS.USE_ACL", str(settings["use_acl"]),
            "MODEL.CROS.GROUP_SIZE", str(case["group_size"]), "MODEL.CROS.INTERVAL", str(case["interval"]),
            "MODEL.DROP_PATH_RATE", "0.0"]


def dense_fixture_input(case: dict) -> torch.Tensor:
    """The case's input image, checked against the sum the fixture recorded."""
    x = torch.randn(1, 3, *case["input_size"], generator=torch.Generator().manual_seed(case["input_seed"]))
    assert x.sum().item() == pytest.approx(case["input_sum"], abs=1e-3)
    return x


def read_flops_table(doc: str) -> list[dict]:
    """The rows of the parameters-and-FLOPs table of docs/``doc`` (| `config` | parameters | paper |
    GFLOPs | paper | difference |), as strings; '—' where the paper gives no figure."""
    with open(os.path.join(os.path.dirname(FIXTURES), "..", "docs", doc), encoding="utf-8") as f:
        rows = [line.strip().strip("|").split("|") for line in f if line.startswith("| `")]
    keys = ("config", "parameters", "paper_parameters", "gflops", "paper_gflops", "difference")
    return [dict(zip(keys, (cell.strip().strip("`") for cell in row))) for row in rows if len(row) == len(keys)]
