"""The release side by side: every measured file's size against its KL divergence from fp16, as a PNG.

Committed next to README.md on every branch of every repo of the release and linked from the card.
The same points give the same bytes (matplotlib's defaults, no Software or date metadata), so a
republish of an unchanged release commits nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from ..quant_types import GB

CHART_FILE = "size-vs-kld.png"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DPI = 100


@dataclass(frozen=True)
class ChartPoint:
    series: str  # the format's title
    label: str  # the variant's short label
    size: int  # bytes
    kld: float  # mean KL divergence from fp16, nats per token


def render_chart(points: list[ChartPoint], title: str) -> bytes:
    """PNG bytes: size on x (MB or GB), mean KLD on a log y axis, one marker and colour per format."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    unit, scale = ("GB", GB) if max(p.size for p in points) >= GB else ("MB", 1_000_000)
    positive = [p.kld for p in points if p.kld > 0]
    floor = min(positive) / 10 if positive else 1e-6  # a zero KLD (identical logits) still gets a point
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # the same bytes whatever matplotlibrc the user has
        figure = Figure(figsize=(8, 5), dpi=DPI)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        series = list(dict.fromkeys(p.series for p in points))
        low, high = min(p.size for p in points) / scale, max(p.size for p in points) / scale
        for index, name in enumerate(series):
            mine = [p for p in points if p.series == name]
            xs, ys = [p.size / scale for p in mine], [max(p.kld, floor) for p in mine]
            axes.scatter(xs, ys, marker=MARKERS[index % len(MARKERS)], color=f"C{index}", s=42, label=name, zorder=3)
            for point, x, y in zip(mine, xs, ys):
                left = high > low and x - low > 0.7 * (high - low)  # labels of the rightmost points go left
                axes.annotate(point.label, (x, y), xytext=(-5 if left else 5, 4), textcoords="offset points",
                              ha="right" if left else "left", fontsize=7, color=f"C{index}")
        axes.set_yscale("log")
        axes.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
        axes.set_xlabel(f"File size ({unit})")
        axes.set_ylabel("Mean KL divergence from fp16 (nats/token, log scale)")
        axes.set_title(title, fontsize=11)
        axes.grid(True, which="both", alpha=0.3, zorder=0)
        axes.legend(title="Format")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
