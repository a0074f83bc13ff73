"""The figures ``medattn-fast train`` writes when matplotlib is installed (the ``bench`` extra):

* :func:`snapshot_figure`: one image of the batch in labelled panels — the input, the label and the
  prediction (class colours with a legend), then each attention gate's map α with its level and
  resolution, on a shared 0–1 colour bar; a 3-D volume shows its middle slice along the first
  axis (and each map the slice at the same relative depth);
* :func:`progress_figure`: loss and Dice against the step (as nnU-Net's ``progress.png`` plots its
  losses and pseudo Dice per epoch), and the throughput below.

Both use matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
:func:`matplotlib_available` tells whether matplotlib is there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .png import middle_slice

__all__ = ["matplotlib_available", "snapshot_figure", "progress_figure", "save_figure"]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def snapshot_figure(image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                    attention: Sequence[np.ndarray] = (), *, num_classes: int, step: Optional[int] = None,
                    dice: Optional[float] = None):
    """A labelled figure of one item: ``image (C, *S)`` (its first channel), ``label (*S)``,
    ``prediction (*S)`` (class indices), ``attention[l] ((1,) *S_l)``: gate ``l``'s α, level 1 the
    highest resolution (as the models return them). Returns a matplotlib ``Figure``."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    image, label, prediction = np.asarray(image), np.asarray(label), np.asarray(prediction)
    dims = label.ndim
    maps = [np.asarray(a, np.float64) for a in attention]
    maps = [a[0] if a.ndim == dims + 1 else a for a in maps]
    panels = 3 + len(maps)
    figure = _figure(2.6 * panels + 0.6, 3.2)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    where = f" (slice {label.shape[0] // 2} of {label.shape[0]})" if dims == 3 else ""
    shown = axes[0].imshow(middle_slice(image[0], dims), cmap="gray")
    axes[0].set_title(f"image, channel 0{where}", fontsize=9)
    figure.colorbar(shown, ax=axes[0], shrink=0.7)
    palette = ListedColormap(["#000000", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
                              "#f032e6", "#bcf60c", "#fabebe"][:max(num_classes, 2)])
    classes = BoundaryNorm(np.arange(-0.5, palette.N + 0.5), palette.N)
    for ax, values, title in ((axes[1], label, "label"), (axes[2], prediction, "prediction")):
        ax.imshow(middle_slice(values, dims), cmap=palette, norm=classes, interpolation="nearest")
        ax.set_title(title + (f" (Dice {dice:.3f})" if title == "prediction" and dice is not None else ""),
                     fontsize=9)
    axes[2].legend(handles=[Patch(color=palette(k), label=f"class {k}") for k in range(min(num_classes, palette.N))],
                   loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    shown = None
    for level, (ax, alpha) in enumerate(zip(axes[3:], maps), start=1):
        shown = ax.imshow(middle_slice(alpha, dims, depth_of=label.shape[0]), cmap="magma", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(f"gate level {level}: α {'×'.join(str(s) for s in alpha.shape)}", fontsize=9)
    if shown is not None:
        figure.colorbar(shown, ax=list(axes[3:]), shrink=0.7, label="α")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if step is not None:
        figure.suptitle(f"step {step}", fontsize=10)
    return figure


def progress_figure(records: List[Dict[str, float]]):
    """Loss and Dice (right axis) against the step, and images/s below, from the training log's
    records (``step``, ``loss``, ``dice``, ``images_per_s``). Returns a matplotlib ``Figure``."""
    steps = [r["step"] for r in records]
    figure = _figure(8.0, 5.5)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss (CE + soft Dice)")
    top.set_ylabel("loss")
    dice_axis = top.twinx()
    dice_axis.plot(steps, [r["dice"] for r in records], color="tab:green", label="Dice (foreground, batch)")
    dice_axis.set_ylabel("Dice")
    dice_axis.set_ylim(0, 1)
    lines = top.get_lines() + dice_axis.get_lines()
    top.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r.get("images_per_s", float("nan")) for r in records], color="tab:gray")
    bottom.set_ylabel("images/s")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    top.set_title("training progress", fontsize=10)
    return figure


def save_figure(figure, path: Union[str, Path]) -> Path:
    """Write ``figure`` as a PNG (atomically: a viewer never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
    return path
