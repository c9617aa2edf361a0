"""``--compile`` (runtime.compile_model): the compiled forward gives the eager logits at several
input sizes from one graph, main.py trains and measures throughput with it, and checkpoints keep
the eager parameter names. The fast tests compile with ``aot_eager`` (the graph capture, AOT
autograd and size guards that inductor gets, without the C++ compile) or, where only main.py's
wiring is checked, ``eager``; the inductor one is slow."""
from __future__ import annotations

import os
import re

import pytest
import torch
from torch._dynamo.utils import counters

import main
import runtime
from config import UserError, load_config
from models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(REPO, "configs", "demo", "digits.yaml")
# The demo model (group 4): stage 3 holds a single 4x4 group at 64x64 and is padded into several
# groups at 96x80 and 112x80, as CrossFormer-T's last stage is at 224x224 and at 256x256. USE_ACL is
# False, so it groups as the ICLR backbone: its LDA groups change shape with the size (8x8, 12x10, 14x10
# in stage 1); the crossformer_pp layout keeps them 4x4.
SIZES = ((64, 64), (96, 80), (112, 80))


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch, tmp_path):
    """One thread, clean compile caches (dynamo's, and an empty directory for inductor's) and graph
    counters, and the process-wide tracing settings that compile_model changes put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # torch's own patch context: monkeypatch would undo a config option with delattr (pytest 9.2),
    # which torch's config module then reports as removed for the rest of the session
    shapes_config = torch.fx.experimental._config
    saved = {name: getattr(shapes_config, name) for name in ("backed_size_oblivious", "use_duck_shape")}
    torch._dynamo.reset()
    counters.clear()
    with shapes_config.patch(saved):
        yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def demo_model(opts=()) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(DEMO_CFG, list(opts))).eval()


def check_one_graph_for_all_sizes(backend: str, sizes=SIZES, batches=(2,), opts=()) -> None:
    model = demo_model(opts)
    eager = {name: p.detach().clone() for name, p in model.state_dict().items()}
    runtime.compile_model(model, backend=backend)
    assert set(model.state_dict()) == set(eager)  # compiled in place: no "_orig_mod." names
    with torch.no_grad():
        for batch in batches:
            for size in sizes:
                x = torch.randn(batch, 3, *size)
                compiled = model(x)
                with torch.compiler.set_stance("force_eager"):
                    reference = model(x)
                assert compiled.shape == (batch, 10)
                difference = (compiled - reference).abs().max().item()
                assert difference <= 1e-4, f"{size}: compiled differs from eager by {difference}"
    assert counters["stats"]["unique_graphs"] == 1, "a new input size compiled another graph"


def test_compiled_forward_equals_eager_at_every_size_from_one_graph():
    check_one_graph_for_all_sizes("aot_eager", batches=(2, 3))


def test_compiled_crossformer_pp_layout_equals_eager_at_every_size_from_one_graph():
    check_one_graph_for_all_sizes("aot_eager", opts=["MODEL.CROS.GROUPING", "crossformer_pp"])


@pytest.mark.slow
def test_inductor_compiled_forward_equals_eager_at_every_size_from_one_graph():
    """Compiled, then again in a new compile that loads the graph from inductor's cache: the
    cached graph keeps the guards of the compiled one."""
    check_one_graph_for_all_sizes("inductor", sizes=SIZES[:2])
    assert counters["inductor"]["fxgraph_cache_hit"] == 0
    torch._dynamo.reset()
    counters.clear()
    check_one_graph_for_all_sizes("inductor", sizes=SIZES[:2])
    assert counters["inductor"]["fxgraph_cache_hit"] == 1


@pytest.mark.slow
def test_inductor_compiled_training_step_equals_eager():
    """Training compiles with static sizes (any_size=False): inductor cannot yet compile the
    backward of a graph with a symbolic height and width."""
    torch.manual_seed(0)
    model = build_model(load_config(DEMO_CFG, ["MODEL.DROP_PATH_RATE", 0.0])).train()  # deterministic
    x, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    eager_loss = torch.nn.functional.cross_entropy(model(x), labels)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    runtime.compile_model(model, any_size=False)
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-4)


def test_without_the_size_settings_a_single_group_stage_would_recompile():
    """What compile_model's settings are for: plain ``torch.compile(dynamic=True)`` specialises
    the first graph on the single-group stage (and on the square size) and compiles again."""
    model = demo_model()
    compiled = torch.compile(model, dynamic=True, backend="eager")
    with torch.no_grad():
        for size in SIZES[:2]:
            compiled(torch.randn(2, 3, *size))
    assert counters["stats"]["unique_graphs"] == 2


FAKE_DATA = ["--cfg", DEMO_CFG, "--num_workers", 0, "--batch-size", 16, "--compile", "--opts", "DATA.DATASET",
             "fake", "DATA.FAKE_SIZE", 32]


@pytest.fixture
def eager_backend_in_main(monkeypatch) -> list:
    """main.py's compile_model with the fastest backend (dynamo's graph capture and guards, run
    eagerly): enough to check what main.py does with it. Returns the models it compiled."""
    compiled = []

    def compile_fast(model, any_size):
        compiled.append((model, any_size))
        runtime.compile_model(model, backend="eager", any_size=any_size)

    monkeypatch.setattr(main, "compile_model", compile_fast)
    return compiled


def test_compile_flag_trains_and_keeps_eager_checkpoint_names(eager_backend_in_main, tmp_path, capsys):
    code = main.run([str(a) for a in FAKE_DATA + ["MODEL_EMA", True, "--output", tmp_path, "--epochs", 1]])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert eager_backend_in_main[0][1] is False and len(eager_backend_in_main) == 1 and "torch.compile:" in out
    # training and evaluation (no_grad) each compiled once, the EMA copy stayed eager
    assert counters["stats"]["unique_graphs"] == 2
    assert len(re.findall(r" \* Acc@1 \d+\.\d+ Acc@5 \d+\.\d+", out)) == 2  # the model and its EMA
    checkpoint = torch.load(tmp_path / "cros_demo_digits" / "default" / "ckpt_epoch_0.pth", weights_only=True)
    names = set(demo_model().state_dict())
    assert set(checkpoint["model"]) == names and set(checkpoint["model_ema"]) == names


def test_compile_flag_throughput(eager_backend_in_main, tmp_path, capsys):
    code = main.run([str(a) for a in FAKE_DATA + ["--output", tmp_path, "--throughput"]])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert eager_backend_in_main == [(eager_backend_in_main[0][0], True)] and counters["stats"]["unique_graphs"] == 1
    assert re.search(r"throughput over \d+ rounds of \d+ passes, precision float32 \(AMP_OPT_LEVEL O0\)", out)
    assert re.search(r"batch_size 16 throughput \d+\.\d images/s", out)


@pytest.mark.parametrize("script", ["detection", "segmentation"])
def test_dense_trainers_refuse_compile(script, tmp_path):
    """They do not compile yet: the flag is refused in one line rather than silently ignored."""
    import importlib

    trainer = importlib.import_module(f"{script}.train")
    config = load_config(os.path.join(REPO, "configs", script, "demo_digits.yaml"),
                         ["COMPILE", True, "OUTPUT", str(tmp_path)])
    with pytest.raises(UserError, match=rf"^COMPILE \(--compile\): .* not by {script}$"):
        trainer.main(config)
    assert os.listdir(tmp_path) == []  # refused before the run folder is made
