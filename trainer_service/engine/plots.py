"""PNG plots of a training job: curves, learning rate, confusion matrix, weight histograms, LR finder.

Built on matplotlib's object-oriented `Figure` API, never pyplot: no global figure registry or backend
switch, so plotting is safe from worker threads and leaks nothing between calls. `Figure.savefig` renders
PNG with the Agg renderer whatever the process's default backend is. Every function returns PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import numpy.typing as npt
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
CURVES_FIGSIZE = (12.0, 4.5)
LEARNING_RATE_FIGSIZE = (8.0, 4.0)
LR_FINDER_FIGSIZE = (8.0, 4.0)
HISTOGRAM_PANEL_SIZE = (5.0, 4.0)  # per layer group; plus room for the colour bar
_ANNOTATE_MAX_CLASSES = 20  # above this, counts in the cells would be unreadable

# (epoch, bin_edges, counts) of one layer group at one epoch.
HistogramEntry = tuple[int, Sequence[float], Sequence[float]]


def training_curves_png(history: Sequence[Mapping[str, float | str]]) -> bytes:
    """Loss and accuracy per epoch (train and validation), a vertical line where fine-tuning starts.

    Rows are one run's epochs in order, with keys epoch, stage ("classifier" / "fine_tuning"), train_loss,
    val_loss, train_accuracy, val_accuracy, learning_rate. The x axis is the epoch across both stages
    (the row's position), so stage-relative epoch numbers still line up. Missing or non-finite values are
    skipped (e.g. no validation set).
    """
    figure = Figure(figsize=CURVES_FIGSIZE, dpi=DPI, layout="constrained")
    loss_axes = figure.add_subplot(1, 2, 1)
    accuracy_axes = figure.add_subplot(1, 2, 2)
    if not history:
        for axes in (loss_axes, accuracy_axes):
            _no_data(axes, "no epochs recorded")
        return _to_png(figure)

    fine_tuning_start = next(
        (i for i, row in enumerate(history) if "fine" in str(row.get("stage", "")).lower()),
        None,
    )
    panels = (
        (loss_axes, "loss", ("train_loss", "val_loss")),
        (accuracy_axes, "accuracy", ("train_accuracy", "val_accuracy")),
    )
    for axes, title, keys in panels:
        for key in keys:
            xs, ys = _series(history, key)
            if xs:
                # Markers keep a one-epoch run visible (a single point draws no line).
                axes.plot(xs, ys, marker="o", markersize=3, label="train" if key.startswith("train") else "validation")
        if fine_tuning_start is not None and fine_tuning_start > 0:
            axes.axvline(fine_tuning_start + 0.5, color="grey", linestyle="--", linewidth=1, label="fine-tuning")
        axes.set_title(title)
        axes.set_xlabel("epoch (both stages)")
        axes.set_xlim(0.5, len(history) + 0.5)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    _, accuracy_values = _series(history, "train_accuracy")
    _, val_accuracy_values = _series(history, "val_accuracy")
    if all(0.0 <= v <= 1.0 for v in accuracy_values + val_accuracy_values):
        accuracy_axes.set_ylim(0.0, 1.02)
    return _to_png(figure)


def learning_rate_png(lrs_per_step: Sequence[float], steps_per_epoch: int) -> bytes:
    """The learning rate of every optimiser step, against the epoch (step / steps_per_epoch)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    figure = Figure(figsize=LEARNING_RATE_FIGSIZE, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    if not lrs_per_step:
        _no_data(axes, "no steps recorded")
        return _to_png(figure)
    epochs = np.arange(len(lrs_per_step), dtype=np.float64) / steps_per_epoch
    axes.plot(epochs, np.asarray(lrs_per_step, dtype=np.float64), marker="o" if len(lrs_per_step) == 1 else None)
    axes.set_title("learning rate")
    axes.set_xlabel("epoch")
    axes.set_ylabel("learning rate")
    # Linear y: schedules may reach 0 (cosine to min_learning_rate=0), which a log scale cannot show.
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes.grid(alpha=0.3)
    return _to_png(figure)


def confusion_matrix_png(matrix: Sequence[Sequence[int]] | npt.NDArray[Any], labels: Sequence[str]) -> bytes:
    """Rows = true label, columns = predicted; colour = the row-normalised rate (recall per true label).

    Normalised colours keep small classes readable next to large ones; cells carry the raw counts when
    there are at most 20 classes.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"matrix must be {n}x{n} to match the labels, got shape {counts.shape}")
    if n == 0:
        raise ValueError("a confusion matrix needs at least one label")
    row_sums = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0)

    side = min(16.0, max(5.0, 1.5 + 0.3 * n))
    figure = Figure(figsize=(side + 1.5, side), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="fraction of true label", shrink=0.8)
    font_size = 9.0 if n <= _ANNOTATE_MAX_CLASSES else max(4.0, 9.0 - (n - _ANNOTATE_MAX_CLASSES) / 8.0)
    ticks = list(range(n))
    axes.set_xticks(ticks, list(labels), rotation=90, fontsize=font_size)
    axes.set_yticks(ticks, list(labels), fontsize=font_size)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title("confusion matrix")
    if n <= _ANNOTATE_MAX_CLASSES:
        for row in range(n):
            for column in range(n):
                dark = rates[row, column] > 0.5  # white text on dark cells
                axes.text(
                    column,
                    row,
                    str(int(counts[row, column])),
                    ha="center",
                    va="center",
                    fontsize=font_size,
                    color="white" if dark else "black",
                )
    return _to_png(figure)


def weight_histogram(params: Iterable[torch.Tensor], bins: int = 50) -> tuple[list[float], list[int]]:
    """(bin_edges, counts) of all finite values of the given tensors together: `bins + 1` edges, `bins` counts.

    Two passes (range, then counts) over the tensors one at a time, so no copy of the whole model is made;
    the tensors may live on any device.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    tensors = [p.detach().flatten() for p in params]
    finite = [t[torch.isfinite(t)].float() for t in tensors]
    finite = [t for t in finite if t.numel() > 0]
    if not finite:
        raise ValueError("no finite parameter values to histogram")
    low = min(float(t.min()) for t in finite)
    high = max(float(t.max()) for t in finite)
    if low == high:  # constant weights (e.g. zero-initialised): centre one unit-wide range on the value
        low, high = low - 0.5, high + 0.5
    counts = torch.zeros(bins, dtype=torch.float64)
    for t in finite:
        counts += torch.histc(t, bins=bins, min=low, max=high).to(device="cpu", dtype=torch.float64)
    edges = np.linspace(low, high, bins + 1, dtype=np.float64)
    return [float(e) for e in edges], [int(c) for c in counts.round()]


def weight_histograms_png(histograms: Mapping[str, Sequence[HistogramEntry]]) -> bytes:
    """One panel per layer group ("early", "late", "head"), one line per epoch, coloured by epoch."""
    groups = list(histograms)
    panel_width, panel_height = HISTOGRAM_PANEL_SIZE
    figure = Figure(figsize=(panel_width * max(1, len(groups)) + 1.0, panel_height), dpi=DPI, layout="constrained")
    if not groups:
        _no_data(figure.add_subplot(), "no weight histograms recorded")
        return _to_png(figure)

    epochs = [entry[0] for entries in histograms.values() for entry in entries]
    low_epoch = min(epochs, default=0)
    high_epoch = max(epochs, default=0)
    # Normalize needs a non-empty range; a single epoch gets the bottom colour.
    norm = Normalize(vmin=low_epoch, vmax=high_epoch if high_epoch > low_epoch else low_epoch + 1)
    colormap = matplotlib.colormaps["viridis"]
    all_axes: list[Axes] = []
    for position, group in enumerate(groups):
        axes = figure.add_subplot(1, len(groups), position + 1)
        all_axes.append(axes)
        axes.set_title(group)
        axes.set_xlabel("weight value")
        if position == 0:
            axes.set_ylabel("count")
        entries = sorted(histograms[group], key=lambda entry: entry[0])
        if not entries:
            _no_data(axes, "no data")
            continue
        for epoch, edges, counts in entries:
            edge_values = np.asarray(edges, dtype=np.float64)
            count_values = np.asarray(counts, dtype=np.float64)
            if edge_values.size != count_values.size + 1:
                raise ValueError(
                    f"{group} epoch {epoch}: {edge_values.size} edges for {count_values.size} counts (need counts + 1)"
                )
            centres = (edge_values[:-1] + edge_values[1:]) / 2.0
            axes.plot(centres, count_values, color=colormap(norm(epoch)), linewidth=1.2)
        axes.grid(alpha=0.3)
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=all_axes, label="epoch")
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return _to_png(figure)


def lr_finder_png(lrs: Sequence[float], losses: Sequence[float], suggested_lr: float | None = None) -> bytes:
    """Loss against learning rate on a log x axis, with the suggested rate marked.

    The y axis stops at twice the starting loss: the sweep's last steps diverge and would flatten the
    interesting part of the curve.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"{len(lrs)} learning rates for {len(losses)} losses")
    figure = Figure(figsize=LR_FINDER_FIGSIZE, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    points = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if lr > 0 and math.isfinite(loss)]
    if not points:
        _no_data(axes, "no finite losses recorded")
        return _to_png(figure)
    xs = [lr for lr, _ in points]
    ys = [loss for _, loss in points]
    axes.plot(xs, ys, marker="o" if len(points) == 1 else None)
    axes.set_xscale("log")
    low, high = min(ys), max(ys)
    top = min(high, 2.0 * ys[0]) if ys[0] > 0 else high
    if top > low:
        margin = 0.05 * (top - low)
        axes.set_ylim(low - margin, top + margin)
    if suggested_lr is not None and suggested_lr > 0:
        axes.axvline(suggested_lr, color="red", linestyle="--", label=f"suggested {suggested_lr:.2g}")
        axes.legend()
    axes.set_title("learning-rate finder")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3, which="both")
    return _to_png(figure)


def _series(history: Sequence[Mapping[str, float | str]], key: str) -> tuple[list[int], list[float]]:
    """(1-based row positions, values) of the rows where `key` holds a finite number."""
    xs: list[int] = []
    ys: list[float] = []
    for position, row in enumerate(history, start=1):
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(position)
            ys.append(float(value))
    return xs, ys


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def _to_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
