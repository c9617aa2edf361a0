"""Flax vs PyTorch on the official configs: largest logit difference and CPU times.

For every config: PyTorch model with random weights, converted into the Flax model, one image at
each size; prints max |Flax - PyTorch| (jit and eager) and the seconds of each step::

    python benchmarks/flax_parity.py                      # all eight configs, 224x224 and 256x320
    python benchmarks/flax_parity.py --configs crossformer/tiny_patch4_group7_224 --sizes 224x224
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from config import load_config  # noqa: E402
from models.build import build_flax_model, build_model  # noqa: E402

CONFIGS = [f"crossformer/{size}_patch4_group7_224" for size in ("tiny", "small", "base", "large")] + [
    f"crossformer_pp/{size}_patch4_group_const_224" for size in ("small", "base", "large", "huge")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--sizes", nargs="+", default=["224x224", "256x320"], help="HxW")
    parser.add_argument("--eager", action="store_true", help="also run the Flax model without jit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, 1 torch thread")
    print("config | size | build s | torch s | jit first s | jit s | max|jit - torch| | max|eager - torch|")
    for name in args.configs:
        config = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        torch.manual_seed(0)
        torch_model = build_model(config).eval()
        with torch.no_grad():
            for param in torch_model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        start = time.perf_counter()
        model = build_flax_model(config, torch_model.state_dict())
        build_s = time.perf_counter() - start
        graphdef, state = nnx.split(model)
        apply = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
        for size in args.sizes:
            height, width = (int(s) for s in size.split("x"))
            images = torch.randn(1, 3, height, width)
            nhwc = images.permute(0, 2, 3, 1).numpy()
            start = time.perf_counter()
            with torch.no_grad():
                expected = torch_model(images).numpy()
            torch_s = time.perf_counter() - start
            start = time.perf_counter()
            logits = np.asarray(apply(state, nhwc))
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            np.asarray(apply(state, nhwc))
            jit_s = time.perf_counter() - start
            eager = f"{np.abs(np.asarray(model(nhwc)) - expected).max():.2e}" if args.eager else "-"
            print(f"{name} | {height}x{width} | {build_s:.1f} | {torch_s:.2f} | {first_s:.1f} | {jit_s:.2f} | "
                  f"{np.abs(logits - expected).max():.2e} | {eager}", flush=True)
            build_s = 0.0


if __name__ == "__main__":
    main()
