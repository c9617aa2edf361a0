"""benchmarks/benchmark.py end to end on the CPU with a tiny setting: the files it writes, one row
per requested measurement with positive speed and memory, and its answer to bad input."""
import csv
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "benchmark.py")
TINY = ["--batch-sizes", "2", "--img-size", "32", "--rounds", "1", "--warmup", "1", "--steps", "1",
        "--threads", "1", "--device", "cpu", "--compile", "off"]


@pytest.fixture(scope="module")
def bench_module():
    """The script as a module, for its functions."""
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_benchmark_writes_a_row_per_measurement(tmp_path):
    proc = run_benchmark("--models", "crossformer_tiny", "--precisions", "float32", "--modes", "train", "infer",
                         "--out", str(tmp_path), *TINY)
    assert proc.returncode == 0, proc.stderr
    [json_path] = glob.glob(str(tmp_path / "benchmark-*.json"))
    [csv_path] = glob.glob(str(tmp_path / "benchmark-*.csv"))
    with open(json_path) as f:
        report = json.load(f)
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1
    rows = report["results"]
    assert [(r["model"], r["mode"], r["dtype"], r["compiled"]) for r in rows] == [
        ("crossformer_tiny_patch4_group7_224", mode, "float32", False) for mode in ("train", "infer")]
    for row in rows:
        assert row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"] and row["img_per_s"] > 0
        assert row["peak_mem_mib"] > 0 and row["memory"] == "rss_peak_minus_after_imports"
        assert row["gflops_per_img"] > 0
    # training holds weights, gradients and AdamW state: more memory than inference
    assert rows[0]["peak_mem_mib"] > rows[1]["peak_mem_mib"]
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["mode"], float(r["img_per_s"])) for r in table] == [(r["mode"], r["img_per_s"]) for r in rows]
    assert "| crossformer_tiny_patch4_group7_224 |" in proc.stdout


@pytest.mark.parametrize("name", ["crossformer_tiny_patch4_group7_224", "crossformer_pp_small_patch4_group_const_224"])
def test_flop_counter_agrees_with_model_flops(bench_module, name):
    """At 224 (no padding) the FLOP counter and CrossFormer's own count, 2 x multiply-accumulates,
    agree, so CrossFormer and its timm peers are counted the same way."""
    flops = bench_module.forward_flops(name, 224)
    assert flops["gflops_per_img"] == pytest.approx(flops["gflops_per_img_model_flops"], rel=0.01)


def test_features_time_the_backbone_at_a_non_square_size_with_model_keywords(tmp_path, bench_module):
    """--features --img-size H W --model-kwargs: the stage maps of the model built with those
    keywords, at HxW; its FLOPs are those of forward_intermediates."""
    proc = run_benchmark("--models", "crossformer_tiny", "--precisions", "float32", "--modes", "infer",
                         "--out", str(tmp_path), *TINY, "--features", "--img-size", "64", "96",
                         "--model-kwargs", "mlp_ratio=2.0")
    assert proc.returncode == 0, proc.stderr
    [json_path] = glob.glob(str(tmp_path / "benchmark-*.json"))
    with open(json_path) as f:
        [row] = json.load(f)["results"]
    assert row["img_size"] == [64, 96] and row["features"] is True and row["model_kwargs"] == {"mlp_ratio": 2.0}
    assert row["img_per_s"] > 0 and "image size 64x96 (HxW); the backbone's stage maps" in proc.stdout
    name = "crossformer_tiny_patch4_group7_224"
    counted = bench_module.forward_flops(name, (64, 96), {"mlp_ratio": 2.0}, True)["gflops_per_img"]
    assert row["gflops_per_img"] == counted
    assert row["gflops_per_img"] < bench_module.forward_flops(name, (64, 96), None, True)["gflops_per_img"]


@pytest.mark.parametrize("bad, culprit", [(["--models", "crossformer_nano"], "crossformer_nano"),
                                          (["--precisions", "float8"], "float8"),
                                          (["--features", "--modes", "train"], "--modes infer"),
                                          (["--model-kwargs", "grouping"], "KEY=VALUE pairs, got 'grouping'"),
                                          (["--model-kwargs", "no_such_keyword=1"], "no_such_keyword")])
def test_benchmark_bad_input_is_one_line_exit_2(tmp_path, bad, culprit):
    proc = run_benchmark(*TINY, "--out", str(tmp_path), *bad)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and culprit in proc.stderr
    assert not os.listdir(tmp_path)  # nothing measured, nothing written


@pytest.mark.parametrize("gpu, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_peak_tflops_by_gpu_name(bench_module, monkeypatch, gpu, peak):
    """MFU's denominator: the dense bf16 peak of the GPU by its name, unless --peak-tflops gives one."""
    monkeypatch.setattr(bench_module.torch.cuda, "get_device_name", lambda device=None: gpu)
    cuda = bench_module.torch.device("cuda")
    assert bench_module.peak_tflops(cuda, None) == peak
    assert bench_module.peak_tflops(cuda, 500.0) == 500.0
    assert bench_module.peak_tflops(bench_module.torch.device("cpu"), None) is None
