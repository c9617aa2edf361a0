"""The curves of a run as a PNG, from its ``metrics.jsonl``: losses, accuracies (or any other
metric the trainer records) and the learning rate, against the epoch (or iteration).

    python plot.py RUN_DIR [RUN_DIR ...]     # writes RUN_DIR/curves.png

main.py writes the same picture at the end of training.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys

from config import UserError
from logger import METRICS_FILE, read_metrics

CURVES_FILE = "curves.png"
X_KEYS = ("epoch", "iteration", "iter", "step")  # the first one a record has is the x axis
HIDDEN_KEYS = ("max_accuracy", "best_bbox_AP", "best_mIoU")  # running maxima: they repeat a curve already drawn
# COCO's numbers per object size and its recalls stay in metrics.jsonl; the picture keeps AP, AP50, AP75
HIDDEN_PATTERN = re.compile(r"_(AP[sml]|AR\d*[sml]?)$")
LABELS = {"train_loss": "train", "val_loss": "val", "acc1": "top-1", "acc5": "top-5", "lr": "learning rate"}


def _series(records: list[dict], x_key: str) -> dict[str, tuple[list, list]]:
    """``{key: (xs, ys)}`` of every numeric key (the x axis and hidden keys left out)."""
    series: dict[str, tuple[list, list]] = {}
    for record in records:
        for key, value in record.items():
            if (key in (x_key, *HIDDEN_KEYS) or HIDDEN_PATTERN.search(key) or isinstance(value, bool)
                    or not isinstance(value, (int, float))):
                continue
            if math.isfinite(value) and (key != "lr" or value > 0):  # the rate is drawn on a log scale
                xs, ys = series.setdefault(key, ([], []))
                xs.append(record[x_key])
                ys.append(value)
    return series


def plot_run(run_dir: str, path: str = "") -> str:
    """Draw ``run_dir/metrics.jsonl`` into ``path`` (default ``run_dir/curves.png``) and return
    the path. Three panels: keys with ``loss`` in the name, the other metrics, and ``lr`` (log
    scale). ImportError without matplotlib; UserError when there is nothing to draw."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(run_dir)
    x_key = next((k for k in X_KEYS if records and k in records[0]), None)
    if x_key is None:
        raise UserError(f"no curves to draw: {os.path.join(run_dir, METRICS_FILE)} is missing, empty, "
                        f"or its records have none of {', '.join(X_KEYS)}")
    records = [r for r in records if x_key in r]
    series = _series(records, x_key)
    metrics = sorted(k for k in series if "loss" not in k and k != "lr")
    panels = [("loss", sorted(k for k in series if "loss" in k)),
              ("val accuracy (%)" if {"acc1", "acc5"} & set(metrics) else "metric", metrics),
              ("learning rate", ["lr"] if "lr" in series else [])]
    panels = [(title, keys) for title, keys in panels if keys]

    figure = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for axes, (title, keys) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            xs, ys = series[key]
            axes.plot(xs, ys, marker="." if len(xs) < 50 else None, label=LABELS.get(key, key))
        axes.set_xlabel(x_key)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if title == "learning rate":
            axes.set_yscale("log")
        axes.legend(fontsize="small" if len(keys) > 6 else None, ncol=1 + len(keys) // 10)
    figure.suptitle(os.path.abspath(run_dir), fontsize=9)
    path = path or os.path.join(run_dir, CURVES_FILE)
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    figure.savefig(temporary, format="png", dpi=100)
    os.replace(temporary, path)
    return path


def write_curves(output_dir: str, logger: logging.Logger) -> None:
    """``plot_run`` at the end of training: the path is logged; without matplotlib, or if drawing
    fails, the log says so and training still ends normally."""
    try:
        path = plot_run(output_dir)
    except ImportError:
        logger.info("matplotlib is not installed: no curves picture (pip install matplotlib, then python plot.py RUN_DIR)")
        return
    except Exception as err:  # noqa: BLE001 - a picture must never fail a finished training
        logger.warning(f"could not draw the curves ({type(err).__name__}: {err}); try python plot.py {output_dir}")
        return
    logger.info(f"curves: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("Draw the curves of training runs")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.run_dirs:
            print(plot_run(run_dir))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
