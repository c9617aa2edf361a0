"""runtime.Precision: the automatic AMP dtype per device capability (mocked), explicit dtypes and
opt levels on the CPU, O0, a bad AMP_DTYPE (exit 2), and a default-precision run of main.py in this
process."""
from __future__ import annotations

import os
import re

import pytest
import torch

import main
import runtime
from config import UserError, load_config
from conftest import run_in_process
from runtime import DeviceFeatures, Precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(REPO, "configs", "demo", "digits.yaml")
DEFAULT = ["AMP_OPT_LEVEL", "native"]  # the demo config turns AMP off; these are the defaults again

CPU_NEITHER = DeviceFeatures()
CPU_AVX512_BF16 = DeviceFeatures(avx512_bf16=True)
CPU_AMX = DeviceFeatures(amx=True)
CPU_AMX_FP16 = DeviceFeatures(amx=True, amx_fp16=True)
CUDA_HOPPER = DeviceFeatures(cuda_capability=(9, 0))
CUDA_VOLTA = DeviceFeatures(cuda_capability=(7, 0))


@pytest.fixture
def features(monkeypatch):
    """``features(DeviceFeatures(...))``: what the hardware probe reports from now on. A mocked
    CUDA device also makes CUDA look available, so that float16 gets its gradient scaler."""

    def mock(found: DeviceFeatures) -> None:
        monkeypatch.setattr(runtime, "probe_device", lambda device: found)
        if found.cuda_capability is not None:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    return mock


def precision(device: str, *opts) -> Precision:
    return Precision(load_config(DEMO_CFG, [*DEFAULT, *opts]), torch.device(device))


def test_auto_is_the_default_dtype():
    from config import get_default_config

    config = get_default_config()
    assert (config.AMP_OPT_LEVEL, config.AMP_DTYPE) == ("native", "auto")


@pytest.mark.parametrize("device, found, dtype, reason", [
    ("cuda", CUDA_HOPPER, torch.bfloat16, "autocast bfloat16 (AMP_DTYPE auto: CUDA compute capability 9.0)"),
    ("cuda", CUDA_VOLTA, torch.float16,
     "autocast float16 with gradient scaler (AMP_DTYPE auto: CUDA compute capability 7.0 has no fast bfloat16)"),
    ("cpu", CPU_AVX512_BF16, torch.bfloat16, "autocast bfloat16 (AMP_DTYPE auto: CPU has avx512_bf16)"),
    ("cpu", CPU_AMX, torch.bfloat16, "autocast bfloat16 (AMP_DTYPE auto: CPU has AMX)"),
    ("cpu", CPU_NEITHER, torch.float32, "float32 (AMP_DTYPE auto: CPU has neither AMX nor avx512_bf16)"),
    ("mps", DeviceFeatures(), torch.float32, "float32 (AMP_DTYPE auto: no fast mixed precision known for mps devices)"),
])
def test_auto_dtype_follows_the_device(features, device, found, dtype, reason):
    features(found)
    chosen = precision(device)
    assert chosen.dtype == dtype
    assert chosen.enabled is (dtype != torch.float32)
    assert chosen.scaler.is_enabled() is (dtype == torch.float16)
    assert str(chosen) == reason


@pytest.mark.parametrize("found", [CUDA_HOPPER, CPU_AMX])
def test_o0_is_float32_whatever_the_device_could_do(features, found):
    features(found)
    chosen = precision("cuda" if found.cuda_capability else "cpu", "AMP_OPT_LEVEL", "O0")
    assert (chosen.dtype, chosen.enabled, chosen.scaler.is_enabled()) == (torch.float32, False, False)
    assert str(chosen) == "float32 (AMP_OPT_LEVEL O0)"


@pytest.mark.parametrize("found", [CPU_NEITHER, CPU_AVX512_BF16])
def test_explicit_bfloat16_is_kept_on_any_cpu(features, found):
    features(found)
    chosen = precision("cpu", "AMP_DTYPE", "bfloat16")
    assert str(chosen) == "autocast bfloat16 (AMP_DTYPE bfloat16)"
    with chosen.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("level, dtype, enabled", [("O1", "bfloat16", True), ("O1", "float16", True),
                                                   ("O0", "bfloat16", False), ("O2", "bfloat16", True)])
@pytest.mark.filterwarnings("ignore:AMP_DTYPE float16")  # float16 on a CPU: honoured, with a warning
def test_precision_on_cpu(level, dtype, enabled):
    config = load_config(DEMO_CFG, ["AMP_OPT_LEVEL", level, "AMP_DTYPE", dtype])
    precision = runtime.Precision(config, torch.device("cpu"))
    expected = getattr(torch, dtype) if enabled else torch.float32
    assert precision.enabled is enabled
    assert precision.dtype == expected
    assert precision.scaler.is_enabled() is (expected == torch.float16)  # float16 autocast needs the scaler
    with precision.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == expected


def test_explicit_float16_on_a_cpu_is_honoured_with_a_warning(features):
    """It used to run float32 without a word; now it runs what was asked, says it is slow, and
    scales the loss as float16 needs."""
    features(CPU_AVX512_BF16)
    with pytest.warns(UserWarning, match="float16 autocast is slow on a CPU without AMX-FP16"):
        chosen = precision("cpu", "AMP_DTYPE", "float16")
    assert chosen.scaler.is_enabled()
    assert str(chosen) == "autocast float16 with gradient scaler (AMP_DTYPE float16; slow on a CPU without AMX-FP16)"
    with chosen.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


def test_explicit_float16_on_a_cpu_with_amx_fp16_has_no_warning(features, recwarn):
    features(CPU_AMX_FP16)
    chosen = precision("cpu", "AMP_DTYPE", "float16")
    assert str(chosen) == "autocast float16 with gradient scaler (AMP_DTYPE float16)"
    assert not [w for w in recwarn if "AMX-FP16" in str(w.message)]


def test_explicit_float16_on_cuda_keeps_its_scaler(features):
    features(CUDA_HOPPER)
    chosen = precision("cuda", "AMP_DTYPE", "float16")
    assert chosen.dtype == torch.float16 and chosen.scaler.is_enabled()
    assert str(chosen) == "autocast float16 with gradient scaler (AMP_DTYPE float16)"


def test_probe_reads_this_cpu():
    """The real probe answers with torch's own CPU feature tests."""
    found = runtime.probe_device(torch.device("cpu"))
    assert found.cuda_capability is None
    assert found.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert found.amx == torch.cpu._is_amx_tile_supported()


def test_bad_amp_dtype_is_a_user_error():
    with pytest.raises(UserError, match=r"^AMP_DTYPE must be one of auto, bfloat16, float16, got 'float8'$"):
        precision("cpu", "AMP_DTYPE", "float8")


FAKE_DATA = ["--cfg", DEMO_CFG, "--num_workers", 0, "--batch-size", 16, "--opts", "DATA.DATASET", "fake",
             "DATA.FAKE_SIZE", 32]


def test_bad_amp_dtype_through_main_is_one_line_and_exit_2(tmp_path, capsys, one_thread_in_process):
    code, err, _ = run_in_process(FAKE_DATA + ["AMP_DTYPE", "float8", "--output", tmp_path, "--throughput"], capsys)
    assert code == 2
    assert err == ["error: AMP_DTYPE must be one of auto, bfloat16, float16, got 'float8'"]


@pytest.mark.parametrize("found, logged", [
    (CPU_AVX512_BF16, "precision: autocast bfloat16 (AMP_DTYPE auto: CPU has avx512_bf16)"),
    (CPU_NEITHER, "precision: float32 (AMP_DTYPE auto: CPU has neither AMX nor avx512_bf16)"),
])
def test_default_precision_trains_and_says_what_it_chose(features, monkeypatch, tmp_path, capsys, one_thread_in_process,
                                                         found, logged):
    """main.py at the default precision on a CPU: one epoch trains and validates in the chosen
    dtype (the logits' dtype is recorded at every forward), saves float32 weights, and the log
    says what was chosen and why."""
    features(found)
    logits_types = []
    real_build_model = main.build_model

    def recording_build_model(config):
        model = real_build_model(config)
        model.head.register_forward_hook(lambda module, inputs, out: logits_types.append(out.dtype))
        return model

    monkeypatch.setattr(main, "build_model", recording_build_model)
    code, err, out = run_in_process(FAKE_DATA + [*DEFAULT, "--output", tmp_path, "--epochs", 1], capsys)
    assert code == 0, err
    assert logged in out
    assert re.search(r" \* Acc@1 \d+\.\d+ Acc@5 \d+\.\d+", out)
    bf16 = found is CPU_AVX512_BF16
    assert len(logits_types) == 2 + 1  # 32 training images in batches of 16, 16 validation images
    assert set(logits_types) == {torch.bfloat16 if bf16 else torch.float32}
    checkpoint = torch.load(tmp_path / "cros_demo_digits" / "default" / "ckpt_epoch_0.pth", weights_only=True)
    assert all(t.dtype == torch.float32 for t in checkpoint["model"].values() if t.is_floating_point())
