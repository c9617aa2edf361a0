"""Training and inference speed and peak memory of CrossFormer models next to timm peers.

    python benchmarks/benchmark.py --models crossformer_tiny crossformer_small swin_tiny \\
        --batch-sizes 8 --precisions float32 bfloat16 --threads 2 --out output/benchmark

Model names are timm names or their unique prefixes (``crossformer_small`` is
``crossformer_small_patch4_group7_224``; ``timm.list_models('crossformer*')`` lists ours). Peers of
similar cost: crossformer_small ~ swin_tiny, crossformer_base ~ swin_small, crossformer_large ~
swin_base.

``--img-size H W`` measures at a non-square size; ``--features`` times the backbone instead of the
classifier: the stage maps (``forward_intermediates``, as detection and segmentation use it,
inference only); ``--model-kwargs KEY=VALUE ...`` passes constructor keywords to every model, e.g.
the CrossFormer-S backbone at a detection size in both grouping layouts:

    python benchmarks/benchmark.py --models crossformer_small --features --modes infer --img-size 800 1333 \\
        --batch-sizes 1 --precisions bfloat16 --model-kwargs grouping=crossformer

Every (model, batch size, precision, eager/compiled, mode) is measured in a fresh child process:
``--warmup`` steps, then ``--rounds`` timed rounds of ``--steps`` steps each; img/s is reported as
the median over rounds with min and max. A training step is forward + backward + AdamW step under
autocast with a GradScaler (active for float16), as the trainer runs it; inference is a forward in
eval mode under ``torch.inference_mode``. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
over the timed rounds; on CPU the child's peak resident set size (``ru_maxrss``) minus its resident
size right after importing torch, timm and crossformer (so: model, optimizer state, activations,
allocator caches, and compiled code when compiled).

FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward on the
meta device, the same way for every model (2 FLOPs per multiply-accumulate). For CrossFormer at
224 it agrees with 2x ``model.flops()`` (recorded in the JSON too) within 1%; at sizes where groups
need padding the counter is higher: it counts the padded work the model does. On CUDA, MFU =
achieved FLOP/s / peak dense bf16 FLOP/s (for every precision), a training image counting 3x its
forward FLOPs; the peak comes from ``--peak-tflops`` or from the GPU's name.

Results go to ``<out>/benchmark-<UTC time>.json`` and ``.csv`` (rewritten after every measurement),
and a markdown table with the machine description is printed at the end.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import crossformer  # noqa: E402,F401  (registers the CrossFormer models with timm)
from config import UserError  # noqa: E402
from runtime import auto_dtype, compile_model, probe_device  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = (*DTYPES, "auto")
MODES = ("train", "infer")
# Dense bf16 (= fp16) tensor-core peak per GPU, TFLOP/s, by a part of torch.cuda.get_device_name();
# the first match counts, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
DEFAULT_MODELS = ("crossformer_tiny", "crossformer_small", "crossformer_pp_small", "swin_tiny")
FIELDS = ("model", "batch_size", "precision", "dtype", "compiled", "mode", "img_per_s", "img_per_s_min",
          "img_per_s_max", "peak_mem_mib", "memory", "gflops_per_img", "mfu", "error")


# ----------------------------------------------------------------------------- the parent: what to measure
def resolve_model(name: str) -> str:
    """A timm model name, or a prefix that names exactly one (``swin_tiny``, ``crossformer_pp_base``)."""
    if name in timm.list_models():
        return name
    matches = timm.list_models(f"{name}_*")
    if len(matches) != 1:
        hint = f"it matches {len(matches)} models" if matches else "see timm.list_models('crossformer*')"
        raise UserError(f"unknown model {name!r} ({hint})")
    return matches[0]


def chosen_dtype(precision: str, device: torch.device) -> str:
    """The dtype a precision names; ``auto`` is the trainer's AMP_DTYPE auto choice."""
    if precision != "auto":
        return precision
    return str(auto_dtype(device.type, probe_device(device))[0]).replace("torch.", "")


def create_model(name: str, img_size: tuple[int, int], kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """The model built for ``img_size`` (height, width) inputs with the constructor keywords
    ``kwargs``; a model without an image-size argument (a CNN) takes any size."""
    kwargs = kwargs or {}
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise UserError(f"model {name}: {err}") from err
        return timm.create_model(name, **kwargs)


def run_forward(model: torch.nn.Module, images: torch.Tensor, features: bool) -> Any:
    """The classifier's forward, or with ``features`` the backbone's stage maps."""
    if features:
        return model.forward_intermediates(images, intermediates_only=True)
    return model(images)


def forward_flops(name: str, img_size: int | tuple[int, int], kwargs: dict[str, Any] | None = None,
                  features: bool = False) -> dict[str, float]:
    """FLOPs of one image's forward (or, with ``features``, of its stage maps), counted on the meta
    device (no weights, no compute)."""
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    with torch.device("meta"):
        model = create_model(name, img_size, kwargs).eval()
        image = torch.empty(1, 3, *img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run_forward(model, image, features)
    flops = {"gflops_per_img": counter.get_total_flops() / 1e9}
    if hasattr(model, "flops") and not features:  # CrossFormer: its own count of multiply-accumulates
        flops["gflops_per_img_model_flops"] = 2 * model.flops(img_size) / 1e9
    return flops


def parse_model_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as keywords; a value is a Python literal (1, 0.5, True, [1, 2]) or a string."""
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--model-kwargs takes KEY=VALUE pairs, got {pair!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def describe_machine(device: torch.device, threads: int | None, peak: float | None) -> dict[str, Any]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "device_features": dataclasses.asdict(probe_device(device)),
        "torch_threads": threads or torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "device": device.type,
    }
    if device.type == "cuda":
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info.update(gpu=torch.cuda.get_device_name(device), capability=capability, cuda=torch.version.cuda,
                    peak_bf16_tflops=peak,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    try:
        info["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def run_child(spec: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """One measurement in a fresh process; its last stdout line is the result, a failure its stderr."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads is not None else {}))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run-one", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
    return {"error": "out of memory" if "out of memory" in proc.stderr.lower() else lines[-1]}


def number(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def mode_cells(row: dict[str, Any] | None, with_mfu: bool) -> list[str]:
    """img/s (min-max), peak MiB and MFU of one measurement, or why it has none."""
    if row is None or row.get("error"):
        cells = [row["error"][:60].replace("|", "/") if row else "", ""]
    else:
        cells = [f"{number(row['img_per_s'])} ({number(row['img_per_s_min'])}-{number(row['img_per_s_max'])})",
                 f"{row['peak_mem_mib']:.0f}"]
    mfu = row.get("mfu") if row else None
    return cells + ([f"{mfu:.1%}" if mfu else ""] if with_mfu else [])


def markdown_table(rows: list[dict[str, Any]], with_mfu: bool) -> str:
    """One line per model, batch, precision and compile setting; train and infer side by side."""
    header = ["model", "GFLOPs/img", "batch", "precision", "compiled"]
    for mode in MODES:
        header += [f"{mode} img/s (min-max)", f"{mode} peak MiB"] + ([f"{mode} MFU"] if with_mfu else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    key = lambda row: (row["model"], row["batch_size"], row["precision"], row["compiled"])  # noqa: E731
    for (model, batch, precision, compiled), group in itertools.groupby(rows, key):
        by_mode = {row["mode"]: row for row in group}
        first = next(iter(by_mode.values()))
        dtype = first["dtype"] + (" (auto)" if precision == "auto" else "")
        cells = [model, f"{first['gflops_per_img']:.2f}", str(batch), dtype, "yes" if compiled else "no"]
        for mode in MODES:
            cells += mode_cells(by_mode.get(mode), with_mfu)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(info: dict[str, Any]) -> str:
    where = (f"{info['gpu']} (compute capability {info['capability']}, CUDA {info['cuda']}), " if "gpu" in info else "")
    return (f"{where}CPU {info['cpu']} ({info['usable_cpus']} of {info['cpu_count']} cores usable, "
            f"{info['torch_threads']} torch threads), torch {info['torch']}, timm {info['timm']}, "
            f"Python {info['python']}, {info['date']}" + (f", commit {info['commit']}" if "commit" in info else ""))


def benchmark(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad:
        raise UserError(f"unknown precision {bad[0]!r} (choose from {', '.join(PRECISIONS)})")
    counts = [*args.batch_sizes, *args.img_size, args.rounds, args.steps,
              *([] if args.threads is None else [args.threads])]
    if min(counts) < 1 or args.warmup < 0 or len(args.img_size) > 2:
        raise UserError("--batch-sizes, --img-size (one or two sizes), --rounds, --steps and --threads must be >= 1, "
                        "--warmup >= 0")
    if args.features and ("train" in args.modes or args.compile != "off"):
        raise UserError("--features times the eager backbone's inference: add --modes infer (and --compile off)")
    img_size = (args.img_size * 2)[:2]
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    models = [resolve_model(name) for name in args.models]
    peak = peak_tflops(device, args.peak_tflops)
    info = describe_machine(device, args.threads, peak)
    flops = {model: forward_flops(model, img_size, model_kwargs, args.features) for model in models}
    settings = {key: value for key, value in vars(args).items() if key != "run_one"}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "benchmark-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(machine_line(info), flush=True)

    rows: list[dict[str, Any]] = []
    for model, batch, precision, compile_, mode in itertools.product(models, args.batch_sizes, args.precisions,
                                                                      compiled, args.modes):
        dtype = chosen_dtype(precision, device)
        spec = dict(model=model, batch_size=batch, precision=precision, dtype=dtype, compiled=compile_, mode=mode,
                    device=device.type, img_size=img_size, warmup=args.warmup, rounds=args.rounds,
                    steps=args.steps, threads=args.threads, features=args.features, model_kwargs=model_kwargs)
        row = {**spec, **flops[model], **run_child(spec, args.threads)}
        if peak and not row.get("error"):
            row["mfu"] = row["img_per_s"] * row["gflops_per_img"] * (3 if mode == "train" else 1) / (peak * 1e3)
        rows.append(row)
        print(f"{model} batch {batch} {dtype} {'compiled' if compile_ else 'eager'} {mode}: "
              + (row["error"] if row.get("error") else
                 f"{number(row['img_per_s'])} img/s, peak {row['peak_mem_mib']:.0f} MiB"), flush=True)
        with open(stem + ".json", "w") as f:
            json.dump({"machine": info, "settings": settings, "results": rows}, f, indent=1)
        with open(stem + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    memory = ("CUDA max allocated" if device.type == "cuda"
              else "CPU peak RSS of the measuring process minus its RSS after imports")
    print(f"\n{machine_line(info)}\nimg/s: median over {args.rounds} rounds of {args.steps} steps after {args.warmup} "
          f"warm-up steps; image size {img_size[0]}x{img_size[1]} (HxW)"
          + ("; the backbone's stage maps (--features)" if args.features else "")
          + (f"; model keywords {model_kwargs}" if model_kwargs else "")
          + f"; peak memory: {memory}; GFLOPs counted by FlopCounterMode"
          + (f"; MFU against {peak:g} TFLOP/s dense bf16, a training image = 3x forward FLOPs" if peak else "") + "\n")
    print(markdown_table(rows, with_mfu=peak is not None))
    print(f"\nwritten: {stem}.json, {stem}.csv")
    failed = [row for row in rows if row.get("error") and row["error"] != "out of memory"]
    return 1 if failed else 0


# ----------------------------------------------------------------------------- the child: one measurement
def peak_rss_mib() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def step_function(spec: dict[str, Any], model: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    """The step to time: a training step (forward, scaled backward, AdamW step) or an inference forward."""
    dtype = DTYPES[spec["dtype"]]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    images = torch.randn(spec["batch_size"], 3, *spec["img_size"], device=device)
    if spec["compiled"]:
        compile_model(model, any_size=spec["mode"] == "infer")  # as main.py's --compile does
    if spec["mode"] == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                run_forward(model, images, spec["features"])
        return infer

    model.train()
    labels = torch.randint(0, model.num_classes, (spec["batch_size"],), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train() -> None:
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return train


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then time ``rounds`` rounds of ``steps`` steps; img/s per round and peak memory."""
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.backends.cudnn.benchmark = True  # as the trainer sets it
    rss_after_imports = peak_rss_mib()
    model = create_model(spec["model"], tuple(spec["img_size"]), spec["model_kwargs"]).to(device)
    step = step_function(spec, model, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(spec["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    speeds = []
    for _ in range(spec["rounds"]):
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        sync()
        speeds.append(spec["batch_size"] * spec["steps"] / (time.perf_counter() - start))
    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        memory, kind = peak_rss_mib() - rss_after_imports, "rss_peak_minus_after_imports"
    return {"img_per_s": statistics.median(speeds), "img_per_s_min": min(speeds), "img_per_s_max": max(speeds),
            "img_per_s_rounds": speeds, "peak_mem_mib": memory, "memory": kind,
            "rss_after_imports_mib": rss_after_imports}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm names or unique prefixes")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        help=f"{', '.join(PRECISIONS)} (auto: bfloat16 where the hardware runs it fast)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off", help="torch.compile the model")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="SIZE",
                        help="image size: one side (square) or height and width")
    parser.add_argument("--features", action="store_true",
                        help="time the backbone's stage maps (forward_intermediates) instead of the classifier")
    parser.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                        help="constructor keywords for every model, e.g. grouping=crossformer (Python literals, "
                             "else strings)")
    parser.add_argument("--warmup", type=int, default=6,
                        help="untimed steps first: compilation happens here, and on a CPU compiled training "
                             "took ~5 steps to reach its speed")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; img/s is their median")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--out", default="output/benchmark", help="folder for the JSON and CSV files")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: one measurement, in a child process
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.run_one:
        print(json.dumps(measure(json.loads(args.run_one))))
        return 0
    try:
        return benchmark(args)
    except UserError as err:  # bad input: one line, exit 2, as runtime.launch reports it for the trainers
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
