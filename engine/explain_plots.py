"""Pictures of explanation maps (engine/explain.py); matplotlib is optional, as for engine/plots.py.

`plot_montage`: the depth slices of a volume in grey with the map overlaid (all slices up to 32, else 16
evenly spaced over the anatomy and the map's strongest slice), one colour scale for the whole volume, in
colours that bright anatomy never has. `plot_memory`: LMTTM's / TTM's memory use per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.plots import pyplot

MAX_SLICES = 32  # more slices than this (64³): show SHOWN of them
SHOWN = 16
ALPHA = 0.8  # opacity of the largest |value|; it falls linearly to 0 at 0


def montage_slices(volume: np.ndarray, heat: np.ndarray | None = None) -> list[int]:
    """The depth indices shown: all of them up to MAX_SLICES; else SHOWN evenly spaced over the depth range
    that holds anatomy (slices with a voxel above a tenth of the volume's maximum) and, if the map is not
    zero, its strongest slice (largest sum of |value|), which is always shown: a small organ in a 64³ volume
    fills its montage."""
    depth = volume.shape[0]
    if depth <= MAX_SLICES:
        return list(range(depth))
    bright = np.flatnonzero(volume.reshape(depth, -1).max(axis=1) > 0.1 * float(volume.max()))
    ends = [int(bright[0]), int(bright[-1])] if len(bright) else [0, depth - 1]
    peak = None
    if heat is not None and np.abs(heat).max() > 0:
        peak = int(np.abs(heat).reshape(depth, -1).sum(axis=1).argmax())
        ends.append(peak)
    low, high = min(ends), max(ends)
    if high - low + 1 < SHOWN:  # a thin range: SHOWN consecutive slices around it
        low = max(0, min(low - (SHOWN - (high - low + 1)) // 2, depth - SHOWN))
        high = low + SHOWN - 1
    shown = [int(round(v)) for v in np.linspace(low, high, SHOWN)]
    if peak is not None and peak not in shown:  # the strongest slice replaces its nearest inner neighbour
        shown[1 + int(np.argmin([abs(z - peak) for z in shown[1:-1]]))] = peak
    return sorted(set(shown))


def overlay_colormap(signed: bool):
    """Colours that never look like grey anatomy (no white, no grey, no black): values from 0 to the peak go
    dark red -> red -> orange -> yellow (matplotlib's `hot` without its black and white ends); a signed map's
    negative values go dark blue -> blue -> cyan (`cool`-like, by their |value|). The opacity shows the size."""
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap, ListedColormap

    warm = colormaps["hot"](np.linspace(0.3, 0.8, 128))
    if not signed:
        return ListedColormap(warm, name="explain")
    cold = LinearSegmentedColormap.from_list("cold", ["#00e5ff", "#1f6bff", "#2a1fd6"])(np.linspace(0, 1, 128))
    return ListedColormap(np.vstack([cold, warm]), name="explain_signed")


def plot_montage(volume: np.ndarray, heat: np.ndarray, out: Path, title: str, *, signed: bool = False) -> Path:
    """Montage of the depth slices of `volume` (S, S, S) in grey with `heat` (S, S, S) overlaid
    (`montage_slices`, `overlay_colormap`; opacity grows with |value|, one scale for the whole volume)."""
    plt = pyplot()

    slices = montage_slices(volume, heat)
    cols = 7 if len(slices) % 7 == 0 else 8
    rows = -(-len(slices) // cols)
    peak = float(np.abs(heat).max()) or 1.0
    cmap = overlay_colormap(signed)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.9, 1.6 * rows + 0.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, z in zip(axes.flat, slices):
        ax.imshow(volume[z], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        value = heat[z] / peak
        rgba = cmap((value + 1) / 2 if signed else value)
        rgba[..., 3] = ALPHA * np.clip(np.abs(value), 0, 1)
        ax.imshow(rgba, interpolation="nearest")
        ax.set_title(f"z = {z}", fontsize=7, pad=2)
    shown = "" if len(slices) == volume.shape[0] else f"  (slices {slices[0]}..{slices[-1]} of {volume.shape[0]})"
    fig.suptitle(title + shown, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.9, bottom=0.01, top=0.9, wspace=0.04, hspace=0.18)
    bar = fig.add_axes([0.915, 0.12, 0.015, 0.7])
    scale = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-peak if signed else 0.0, peak))
    fig.colorbar(scale, cax=bar).ax.tick_params(labelsize=7)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_memory(record: dict, out: Path, title: str) -> Path:
    """One sample's memory use, one row per step: the mean read weight on each memory token (LMTTM: the
    current, past and future blocks marked c, p, f; the future block is also the one written, w), the share
    of the read on the step's input tokens, and the writer's weight on each source group."""
    plt = pyplot()
    reads, inputs, writes = record["read_memory"], record["read_inputs"], record["write_sources"]
    steps, memory = reads.shape
    fig, axes = plt.subplots(1, 3, figsize=(10, 0.9 + 0.32 * steps),
                             gridspec_kw={"width_ratios": [8, 1, 2.5]}, squeeze=False)
    ax = axes[0, 0]
    image = ax.imshow(reads, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01).ax.tick_params(labelsize=7)
    ax.set_xlabel("memory token", fontsize=8)
    ax.set_ylabel("step (depth slab)", fontsize=8)
    ax.set_title("read attention on memory tokens", fontsize=8)
    if "schedule" in record:
        k = int(record["blocks"])
        m = memory // k
        for b in range(1, k):
            ax.axvline(b * m - 0.5, color="white", linewidth=0.8)
        for t, (current, past, future) in enumerate(np.asarray(record["schedule"])):
            marks = {}
            for block, mark in ((current, "c"), (past, "p"), (future, "f,w")):
                marks[int(block)] = marks[int(block)] + "/" + mark if int(block) in marks else mark
            for block, mark in marks.items():
                ax.text(block * m + m / 2 - 0.5, t, mark, ha="center", va="center", fontsize=7, color="white")
    _column(fig, axes[0, 1], inputs[:, None], "read on\ninputs", [""])
    _column(fig, axes[0, 2], writes, "write drew from", list(record["write_groups"]))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _column(fig, ax, values: np.ndarray, title: str, labels: list[str]) -> None:
    ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    for (t, g), v in np.ndenumerate(values):
        ax.text(g, t, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45 if len(labels) > 1 else 0)
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
