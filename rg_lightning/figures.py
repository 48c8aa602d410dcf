"""Figures next to a run's results: built on matplotlib's object API (pyplot's global backend and figure list
stay as the user's process has them) and written atomically."""

from __future__ import annotations

import math

from rg_lightning.atomic import atomic_file


def new_figure(columns: int, width: float, height: float, **kwargs):
    """A figure with ``columns`` side-by-side axes; returns ``(figure, axes)``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(1, columns, **kwargs)
    return figure, axes


def save_png(figure, path: str) -> None:
    """Write ``figure`` to ``path`` as PNG, staged then renamed (a crash leaves no half-written image)."""
    figure.tight_layout()
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)


def selection_figure(selection: dict):
    """Direction selection (Arditi et al.) at a glance: per candidate layer and position, what ablating the
    direction does to the harmful refusal score and to harmless next-token KL, and what adding it does to
    harmless prompts; the chosen candidate circled, the thresholds dashed."""
    rows, chosen = selection["candidates"], selection["chosen"]
    figure, axes = new_figure(3, 14, 4)
    panels = (("ablation_score", "harmful refusal score, direction ablated", selection.get("harmful_score")),
              ("harmless_kl", "harmless next-token KL, direction ablated", selection.get("kl_threshold")),
              ("addition_score", "harmless refusal score, direction added", 0.0))
    for axis, (key, title, line) in zip(axes, panels):
        for position in sorted({row["position"] for row in rows}):
            mine = sorted((row for row in rows if row["position"] == position), key=lambda row: row["layer"])
            axis.plot([row["layer"] for row in mine], [_finite(row[key]) for row in mine], marker=".",
                      label=f"position {position}")
        axis.scatter([chosen["layer"]], [_finite(chosen[key])], s=120, facecolors="none", edgecolors="black",
                     label="chosen")
        if line is not None:
            axis.axhline(line, color="gray", linestyle="--", linewidth=1)
        if key == "harmless_kl":
            axis.set_yscale("symlog", linthresh=1e-3)
            axis.set_ylim(bottom=0)
        axis.set(xlabel="layer", title=title)
        _integer_layers(axis)
    axes[0].legend(fontsize=7, title="dashed: unablated / threshold", title_fontsize=7)
    return figure


def subspace_figure(dims: dict[str, tuple[int, int, int]]):
    """Per protected module (grouped by its short name, over layers): how many input directions the guard holds
    exactly and how many it damps, against the input width."""
    kinds: dict[str, list[tuple[int, int, int, int]]] = {}
    for name, (exact, damped, width) in dims.items():
        parts = name.split(".")
        layer = next((int(part) for part in parts if part.isdigit()), -1)
        kinds.setdefault(parts[-1], []).append((layer, exact, damped, width))
    same: dict[tuple, list[str]] = {}  # modules reading one input (q/k/v, gate/up) share a curve and a label
    for kind, values in sorted(kinds.items()):
        same.setdefault(tuple(sorted(values)), []).append(kind)
    figure, axes = new_figure(2, 12, 4, sharex=True)
    for values, names in same.items():
        layers, label = [v[0] for v in values], " / ".join(names)
        line, = axes[0].plot(layers, [v[1] / v[3] for v in values], marker=".", label=label)
        axes[1].plot(layers, [v[2] / v[3] for v in values], marker=".", color=line.get_color(), label=label)
    for axis in axes:
        _integer_layers(axis)
    axes[0].set(xlabel="layer (-1: outside the blocks)", ylabel="share of the input width",
                title="Input directions held exactly")
    axes[1].set(xlabel="layer (-1: outside the blocks)", title="Input directions damped (ridge tail)")
    axes[0].legend(fontsize=7)
    return figure


def _integer_layers(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def feedback_figure(history: list[dict], low: float, high: float, min_scale: float, max_scale: float):
    """RefusalFeedback over a fit: the harmful probes' margin against the thresholds (and the share still refused),
    and the tail's scale it set, within its range."""
    steps = [record["step"] for record in history]
    figure, (margin, scale) = new_figure(2, 11, 4)
    margin.plot(steps, [_finite(record["margin"]) for record in history], color="tab:red", label="margin")
    margin.plot(steps, [record["refused_share"] for record in history], color="tab:gray", linestyle=":",
                label="harmful probes refused")
    for threshold, name in ((low, "low: tighten below"), (high, "high: loosen above")):
        margin.axhline(threshold, color="gray", linestyle="--", linewidth=1)
        margin.annotate(name, (steps[0], threshold), fontsize=7, va="bottom")
    margin.set(xlabel="step", ylabel="share of the fit-start score", title="Harmful probes")
    margin.legend(fontsize=7)
    scale.step(steps, [record["scale"] for record in history], where="post", color="tab:blue")
    for bound in (min_scale, max_scale):
        scale.axhline(bound, color="gray", linestyle="--", linewidth=1)
    scale.set(xlabel="step", ylabel="times the built rate", yscale="log", title="Damped tail's pull-back")
    return figure
