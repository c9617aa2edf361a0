import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

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


def deterministic_algorithms() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.fixture(autouse=True)
def trainer_flags_restored():
    """The trainers run in-process by tests set torch's thread count (the CPU plan, which follows
    the machine's load), cuDNN and determinism flags for their process (runtime.setup_run); put
    them back after each test."""
    benchmark, deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    algorithms, threads = deterministic_algorithms(), torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
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
# ----------------------------------------------------------------------------- shared by the training tests
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
DEMO_CFG = "configs/demo/digits.yaml"  # the digits demo, relative to ROOT (where the scripts run)
DEMO_RUN_DIR = os.path.join("cros_demo_digits", "default")  # its run folder under --output
ACC_LINE = re.compile(r" \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+)")
TRAIN_LINE = re.compile(r"Train: \[(\d+)/(\d+)\]\[(\d+)/(\d+)\].*?lr (\S+)\s.*?grad_norm (\S+) ")
TIMEOUT_S = 300


def training_environment() -> dict:
    """A trainer subprocess's environment: one torch thread, unbuffered output, no launcher's variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class TrainingProcess:
    """One launch of a training command (``args`` after the Python executable) whose run log is
    followed for progress markers. Its output goes to files, so a long run never blocks on a
    full pipe; it runs in a session of its own (a signal to its group reaches its workers, as a
    terminal's Ctrl-C does)."""

    def __init__(self, args, run_dir, log_name="log_rank0.txt"):
        self.log = Path(run_dir) / log_name
        self.seen = self.log.read_text() if self.log.exists() else ""
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=self.stdout,
                                        stderr=self.stderr, text=True, env=training_environment(),
                                        start_new_session=True)

    def new_log(self) -> str:
        text = self.log.read_text() if self.log.exists() else ""
        return text[len(self.seen):]

    def output(self) -> tuple[str, str]:
        for stream in (self.stdout, self.stderr):
            stream.seek(0)
        return self.stdout.read(), self.stderr.read()

    def wait_for(self, pattern: str, accept=lambda match: True, timeout: float = 300) -> re.Match:
        """Wait until this launch's log has a match of ``pattern`` that ``accept`` takes; return it."""
        deadline = time.time() + timeout
        while True:
            found = [match for match in re.finditer(pattern, self.new_log()) if accept(match)]
            if found:
                return found[-1]
            assert self.process.poll() is None, f"run ended early:\n{self.output()[1][-3000:]}"
            assert time.time() < deadline, f"{pattern!r} did not appear in time"
            time.sleep(0.05)

    def stop(self, signum: int, group: bool = False, timeout: float = 120) -> tuple[int, str, str, float]:
        """Send ``signum`` (to the whole process group if ``group``); return the exit code,
        stdout, stderr and the seconds until the process ended."""
        sent = time.time()
        if group:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        self.process.wait(timeout=timeout)
        return (self.process.returncode, *self.output(), time.time() - sent)

    def finish(self, timeout: float = 600) -> str:
        self.process.wait(timeout=timeout)
        stdout, stderr = self.output()
        assert self.process.returncode == 0, stderr[-3000:]
        return stdout


def run_script(script: str, *args, launcher: tuple = (), timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python [launcher...] script args`` from the repository root, outside any launcher's env."""
    command = [sys.executable, *launcher, script, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=training_environment(), capture_output=True, text=True,
                          timeout=timeout)


def run_main(*args, launcher: tuple = (), timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_script("main.py", *args, launcher=launcher, timeout=timeout)


def explain(result: subprocess.CompletedProcess) -> str:
    return (f"exit {result.returncode}\n--- stdout (tail)\n{result.stdout[-4000:]}\n"
            f"--- stderr (tail)\n{result.stderr[-4000:]}")


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, explain(result)


def accuracies(text: str) -> list[tuple[str, str]]:
    """Every ``(Acc@1, Acc@5)`` pair printed by ``validate``, as printed (three decimals)."""
    return ACC_LINE.findall(text)


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_in_process(argv: list, capsys) -> tuple[int, list[str], str]:
    """``main.run(argv)`` in this process: exit code, stderr lines, stdout."""
    import main

    capsys.readouterr()
    code = main.run([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_args(data_path, output) -> list:
    """main.py's arguments for the digits demo without loader workers."""
    return ["--cfg", DEMO_CFG, "--data-path", data_path, "--output", output, "--num_workers", 0]


@pytest.fixture(scope="session")
def one_epoch_run(digits_dir, tmp_path_factory) -> SimpleNamespace:
    """One epoch of the demo config on digits (demo model, batch 64, 22 steps), trained once per
    session by main.py in a subprocess."""
    output = tmp_path_factory.mktemp("one_epoch")
    result = run_main(*demo_args(digits_dir, output), "--epochs", 1, "--opts", "PRINT_FREQ", 5)
    check_ok(result)
    run_dir = output / DEMO_RUN_DIR
    return SimpleNamespace(result=result, output=output, run_dir=run_dir,
                           ckpt=run_dir / "ckpt_epoch_0.pth", acc=accuracies(result.stdout))


FOUR_EPOCHS, KEEP_CHECKPOINTS = 4, 2


def four_epoch_args(digits_dir, output) -> list:
    return [*demo_args(digits_dir, output), "--epochs", FOUR_EPOCHS, "--opts", "KEEP_CHECKPOINTS", KEEP_CHECKPOINTS,
            "SAVE_FREQ", 1, "PRINT_FREQ", 5]


@pytest.fixture(scope="session")
def four_epoch_run(digits_dir, tmp_path_factory) -> SimpleNamespace:
    """Four epochs of the demo config on digits, a checkpoint each epoch and the newest
    KEEP_CHECKPOINTS kept, trained once per session by main.py in a subprocess (like a user's run)."""
    output = tmp_path_factory.mktemp("four_epochs")
    args = four_epoch_args(digits_dir, output)
    result = run_main(*args)
    check_ok(result)
    run_dir = output / DEMO_RUN_DIR
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(args=args, output=output, run_dir=run_dir, result=result, metrics=metrics)


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Two state dicts hold the same tensors, within ``tol``."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=tol, msg=key)


def assert_bit_identical(path, reference, keys=("model",)) -> None:
    """The ``keys`` weights of two checkpoints are equal to the bit."""
    from utils import load_checkpoint_file

    ours, theirs = load_checkpoint_file(str(path)), load_checkpoint_file(str(reference))
    for key in keys:
        assert ours[key].keys() == theirs[key].keys()
        for name in ours[key]:
            assert torch.equal(ours[key][name], theirs[key][name]), (key, name)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> str:
    """A small copy of the bundled digits detection set: 16 train and 8 val images."""
    import detection.digits_coco as digits_coco

    sizes = dict(digits_coco.SPLIT_IMAGES)
    digits_coco.SPLIT_IMAGES.update(train=16, val=8)
    try:
        return digits_coco.ensure_digits_coco(str(tmp_path_factory.mktemp("data") / "digits_coco"))
    finally:
        digits_coco.SPLIT_IMAGES.update(sizes)


def write_ade(root, images: int = 4, size=(40, 32), classes: int = 4, seed: int = 0) -> str:
    """A small ADE20K-layout folder: squares of class 1..classes on 0 ("other") backgrounds,
    coloured by class so that they can be learned."""
    rng = np.random.default_rng(seed)
    for split in ("training", "validation"):
        os.makedirs(os.path.join(root, "images", split))
        os.makedirs(os.path.join(root, "annotations", split))
        for n in range(images):
            label = np.full(size[::-1], 1, np.uint8)
            label[:4] = 0
            for c in range(2, classes + 1):
                top, left = rng.integers(0, size[1] - 10), rng.integers(0, size[0] - 10)
                label[top:top + 10, left:left + 10] = c
            colours = np.array([[0, 0, 0], [60, 60, 60], [250, 30, 30], [30, 250, 30], [30, 30, 250]], np.uint8)
            Image.fromarray(colours[label]).save(os.path.join(root, "images", split, f"{n}.jpg"), quality=98)
            Image.fromarray(label).save(os.path.join(root, "annotations", split, f"{n}.png"))
    return str(root)


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


# ----------------------------------------------------------------------------- a toy run of the run core, in process
CPU = torch.device("cpu")


def toy_config(output, schedule: str, interrupted: bool):
    from config import get_default_config

    config = get_default_config()
    config.OUTPUT = str(output)
    config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS = 2, 0
    config.TRAIN.EPOCHS, config.SAVE_FREQ, config.PRINT_FREQ, config.AMP_OPT_LEVEL = 3, 2, 1, "O0"
    config.SEG.MAX_ITERS, config.SEG.EVAL_INTERVAL, config.SEG.CHECKPOINT_INTERVAL = 10, 5, 4
    # the interrupted runs save a step checkpoint after every update: when they are taken changes nothing
    config.TRAIN.CHECKPOINT_MINUTES = 1e-9 if interrupted else 0
    config.freeze()
    return config


class ToyRun:
    """A two-layer model with dropout on 8 samples (4 batches a pass), trained through TrainingRun
    with the ``schedule`` given; ``signal_at`` sends SIGTERM to this process in the ``losses`` call
    or ``evaluate`` call of that number (counted over launches)."""

    def __init__(self, output, schedule: str, interrupted: bool = False, signal_at: tuple[str, int] = ("", 0)):
        from torch.utils.data import TensorDataset

        from data.resumable import resumable_loader
        from runtime import Precision
        from training import BestModel, EpochSchedule, IterationSchedule, TrainingRun
        from utils import DistInfo

        self.config = config = toy_config(output, schedule, interrupted)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(8, 3, generator=generator), torch.randint(0, 2, (8,), generator=generator))
        self.loader = resumable_loader(data, config, 0, 1)
        steps = len(self.loader)
        kind = EpochSchedule(config, steps) if schedule == "epoch" else IterationSchedule(config, steps)

        def set_learning_rate(updates):
            for group in optimizer.param_groups:
                group["lr"] = 0.01 / (1 + updates)

        self.run = TrainingRun(config, DistInfo(0, 1, 0, CPU), logging.getLogger("toy_run"), kind, self.model,
                               optimizer, Precision(config, CPU), set_learning_rate,
                               BestModel("score", "best_score", "best_score", "Max score: {:.4f}",
                                         lambda r: f"score {r['score']:.4f}"))
        self.signal_at = signal_at
        self.calls = {"losses": 0, "evaluate": 0}
        self.probe = torch.randn(4, 3, generator=generator)

    def _count(self, name):
        self.calls[name] += 1
        if self.signal_at == (name, self.calls[name]):
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the run's handler, acted on at the step boundary

    def losses(self, batch):
        from training import supervised_losses

        self._count("losses")
        return supervised_losses(self.model, torch.nn.CrossEntropyLoss(), CPU)(batch)

    def evaluate(self):
        self._count("evaluate")
        with torch.no_grad():
            return {"score": float(self.model.eval()(self.probe).softmax(1)[:, 0].mean())}

    def fit(self):
        """Restore, then fit; the signal handlers of this process are put back afterwards."""
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        try:
            self.run.restore()
            if not self.run.complete:
                self.run.fit(self.loader, self.losses, self.evaluate)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self
