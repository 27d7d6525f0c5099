"""Training plots drawn with Pillow alone (the before/after grids are in ``sample_grid``).

matplotlib is not a dependency of the pack (ComfyUI does not ship it), and a loss curve only needs
lines and text, which Pillow draws directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

# image_grid lives in sample_grid; kept importable from here, where the nodes have always found it.
from .sample_grid import BACKGROUND, TEXT_COLOR, image_grid
from .sample_grid import font as _font
from .sample_grid import text_size as _text_size

__all__ = [
    "BASELINE_COLOR",
    "RAW_COLOR",
    "RESTORED_COLOR",
    "SMOOTH_COLOR",
    "ema",
    "image_grid",
    "render_loss_plot",
]

AXIS_COLOR = (90, 90, 90)
GRID_COLOR = (230, 230, 230)
# The raw loss is drawn as a pale tint of the smoothed colour (no alpha needed on an RGB canvas).
RAW_COLOR = (176, 204, 232)
SMOOTH_COLOR = (31, 119, 180)
RESTORED_COLOR = (214, 96, 20)
BASELINE_COLOR = (128, 128, 128)

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]


def _finite(v: Any) -> float | None:
    """``v`` as a finite float, or ``None`` for NaN/inf/None/unparseable values."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, same length as ``values``.

    ``m_t = s * m_{t-1} + (1 - s) * x_t`` started at 0 and divided by ``1 - s**n`` (n = number
    of values seen), so the first points are not dragged towards zero. Non-finite values are
    skipped: they leave the average untouched and come out as NaN, so plots leave a gap there.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out: list[float] = []
    avg = 0.0
    n = 0
    for v in values:
        x = _finite(v)
        if x is None:
            out.append(math.nan)
            continue
        n += 1
        avg = smoothing * avg + (1.0 - smoothing) * x
        out.append(avg / (1.0 - smoothing**n))
    return out


def _nice_step(span: float, target: int) -> float:
    """A 1/2/5 x 10^k step giving about ``target`` intervals over ``span``."""
    raw = span / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if raw <= m * mag:
            return m * mag
    return 10.0 * mag


def _nice_ticks(lo: float, hi: float, target: int = 5, min_step: float = 0.0) -> list[float]:
    step = max(_nice_step(hi - lo, target), min_step)
    first = math.ceil(lo / step - 1e-9) * step
    # Counted, not accumulated: a step below the values' float resolution would never move an
    # accumulating tick past ``hi`` (a one-step run's loss and its EMA differ in the last bit).
    count = math.floor((hi - first) / step + 1e-9) + 1
    return [0.0 if abs(t) < step * 1e-9 else t for t in (first + i * step for i in range(max(count, 0)))]


def _fmt_tick(v: float, step: float) -> str:
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{v:.{min(decimals, 6)}f}"


@dataclass
class _Series:
    xs: Sequence[float]
    ys: Sequence[float]
    color: Color
    width: int
    label: str
    markers: bool = False


def _draw_panel(
    draw: ImageDraw.ImageDraw,
    box: Box,
    series: Sequence[_Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_y: bool,
    empty_text: str,
) -> None:
    """Draw one framed chart (title, ticks, grid, lines, legend) inside ``box``."""
    x0, y0, x1, y1 = box
    title_font, tick_font = _font(15), _font(11)
    tick_h = _text_size(draw, "0123456789", tick_font)[1]

    def ty(v: float) -> float:
        return math.log10(v) if log_y else v

    # Keep only points that can be placed: finite, and positive on a log axis.
    pts: list[list[tuple[float, float] | None]] = []
    for s in series:
        row: list[tuple[float, float] | None] = []
        for x, y in zip(s.xs, s.ys):
            fx, fy = _finite(x), _finite(y)
            ok = fx is not None and fy is not None and (not log_y or fy > 0)
            row.append((fx, ty(fy)) if ok else None)  # type: ignore[arg-type]
        pts.append(row)
    valid = [p for row in pts for p in row if p is not None]

    draw.text((x0 + 8, y0 + 4), title, fill=TEXT_COLOR, font=title_font)
    top = y0 + 8 + _text_size(draw, title or "A", title_font)[1] + 8

    if not valid:
        draw.rectangle((x0 + 8, top, x1 - 8, y1 - 8), outline=GRID_COLOR)
        w, h = _text_size(draw, empty_text, title_font)
        draw.text(((x0 + x1 - w) / 2, (top + y1 - h) / 2), empty_text, fill=AXIS_COLOR, font=title_font)
        return

    xlo, xhi = min(p[0] for p in valid), max(p[0] for p in valid)
    ylo, yhi = min(p[1] for p in valid), max(p[1] for p in valid)
    if xhi == xlo:  # a single step: give it some width so it lands mid-axis
        xlo, xhi = xlo - 1, xhi + 1
    # Equal to float precision counts as equal: one step's loss and its EMA can differ in the
    # last bit, and a span of 1e-16 would make ticks no float can tell apart.
    if yhi - ylo <= 1e-9 * max(abs(ylo), abs(yhi), 1e-12):
        pad = 0.5 if log_y else max(abs(ylo) * 0.05, 1e-3)
        ylo, yhi = ylo - pad, yhi + pad
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - pad, yhi + pad

    # Y ticks on a log axis: 1-2-5 per decade when that gives a handful, bare decades when the
    # range is wide, ordinary nice numbers when it is narrower than one 1-2-5 step.
    if log_y:
        cands = [
            math.log10(m * 10.0**k)
            for k in range(math.floor(ylo), math.ceil(yhi) + 1)
            for m in (1, 2, 5)
            if ylo <= math.log10(m * 10.0**k) <= yhi
        ]
        if len(cands) > 10:
            cands = [t for t in cands if abs(t - round(t)) < 1e-9]
        if len(cands) >= 2:
            yticks = cands
            ylabels = [f"{10.0**t:.3g}" for t in cands]
        else:
            lin = [t for t in _nice_ticks(10.0**ylo, 10.0**yhi, 4) if t > 0]
            step = lin[1] - lin[0] if len(lin) > 1 else lin[0] if lin else 1.0
            yticks = [math.log10(t) for t in lin]
            ylabels = [_fmt_tick(t, step) for t in lin]
    else:
        yticks = _nice_ticks(ylo, yhi, 5)
        step = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
        ylabels = [_fmt_tick(t, step) for t in yticks]
    # Steps are whole numbers, so never tick between them.
    xticks = _nice_ticks(xlo, xhi, 6, min_step=1.0)
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    xlabels = [_fmt_tick(t, xstep) for t in xticks]

    label_w = max(
        [_text_size(draw, t, tick_font)[0] for t in ylabels] + [_text_size(draw, y_label, tick_font)[0]]
    )
    px0 = x0 + 14 + label_w
    px1 = x1 - 14
    py0 = top + tick_h  # room above the plot for the y-axis name
    py1 = y1 - 2 * tick_h - 16
    if px1 - px0 < 10 or py1 - py0 < 10:
        return  # too small to draw anything meaningful

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            px0 + (x - xlo) / (xhi - xlo) * (px1 - px0),
            py1 - (y - ylo) / (yhi - ylo) * (py1 - py0),
        )

    for t, lab in zip(yticks, ylabels):
        _, py = to_px(xlo, t)
        draw.line((px0, py, px1, py), fill=GRID_COLOR)
        w, h = _text_size(draw, lab, tick_font)
        draw.text((px0 - 6 - w, py - h / 2 - 1), lab, fill=AXIS_COLOR, font=tick_font)
    for t, lab in zip(xticks, xlabels):
        px, _ = to_px(t, ylo)
        draw.line((px, py0, px, py1), fill=GRID_COLOR)
        w, _ = _text_size(draw, lab, tick_font)
        draw.text((px - w / 2, py1 + 4), lab, fill=AXIS_COLOR, font=tick_font)
    draw.rectangle((px0, py0, px1, py1), outline=AXIS_COLOR)
    draw.text(
        (px0 - 6 - _text_size(draw, y_label, tick_font)[0], top - 2), y_label, fill=AXIS_COLOR, font=tick_font
    )
    w, _ = _text_size(draw, x_label, tick_font)
    draw.text(((px0 + px1 - w) / 2, py1 + 6 + tick_h), x_label, fill=AXIS_COLOR, font=tick_font)

    for s, row in zip(series, pts):
        # Break the line at skipped points so a NaN shows as a gap instead of a bridge.
        runs: list[list[tuple[float, float]]] = [[]]
        for p in row:
            if p is None:
                if runs[-1]:
                    runs.append([])
            else:
                runs[-1].append(to_px(*p))
        for run in runs:
            if len(run) >= 2:
                draw.line(run, fill=s.color, width=s.width, joint="curve" if s.width > 1 else None)
            if len(run) == 1 or s.markers:
                r = max(s.width, 2) + (1 if s.markers else 0)
                for px, py in run:
                    draw.ellipse((px - r, py - r, px + r, py + r), fill=s.color)

    # Legend right-aligned on the title line, outside the plot so it never hides a curve.
    lx, ly = px1, y0 + 8
    for s in reversed(series):
        if not s.label:
            continue
        w, h = _text_size(draw, s.label, tick_font)
        draw.text((lx - w, ly), s.label, fill=TEXT_COLOR, font=tick_font)
        mid = ly + h / 2 + 1
        draw.line((lx - w - 22, mid, lx - w - 6, mid), fill=s.color, width=3)
        lx -= w + 34


_METRIC_NAMES = {"psnr": "PSNR", "psnr_y": "PSNR-Y", "ssim": "SSIM", "latent_mse": "latent MSE"}


def _validation_series(rows: Sequence[Mapping[str, Any]], metric: str) -> list[_Series]:
    parsed = []
    for row in rows:
        step = _finite(row.get("step"))
        if step is not None:
            parsed.append((step, row.get(f"{metric}_restored"), row.get(f"{metric}_degraded")))
    parsed.sort(key=lambda r: r[0])
    steps = [r[0] for r in parsed]
    # Missing keys and non-finite values (e.g. the "inf" PSNR of a perfect match) become NaN,
    # which _draw_panel skips.
    restored = [math.nan if _finite(r[1]) is None else float(r[1]) for r in parsed]
    baseline = [math.nan if _finite(r[2]) is None else float(r[2]) for r in parsed]
    name = _METRIC_NAMES.get(metric, metric.upper())
    return [
        _Series(steps, baseline, BASELINE_COLOR, 2, f"degraded ({name})", True),
        _Series(steps, restored, RESTORED_COLOR, 2, f"restored ({name})", True),
    ]


def render_loss_plot(
    losses: Sequence[float],
    *,
    smoothing: float = 0.9,
    validation: Sequence[Mapping[str, Any]] | None = None,
    width: int = 768,
    height: int = 432,
    log_y: bool = False,
    steps: Sequence[float] | None = None,
    title: str = "Training loss",
    validation_metric: str = "psnr",
) -> Image.Image:
    """Render the training loss (raw + EMA) and, optionally, validation scores as an RGB image.

    ``losses[i]`` is plotted at step ``steps[i]`` (default ``i + 1``, as training counts steps
    from 1). The raw loss is a faint line, the bias-corrected EMA (``smoothing``) a strong one.
    ``validation`` rows are dicts with ``"step"`` and ``"<metric>_restored"`` /
    ``"<metric>_degraded"`` keys; when given (even empty) a second panel below shows the restored
    score against the degraded baseline. NaN/inf values are skipped; no data draws a placeholder.
    The returned image is always ``width`` x ``height``.
    """
    if steps is not None and len(steps) != len(losses):
        raise ValueError(
            f"steps has {len(steps)} entries but losses has {len(losses)}; pass one step per loss"
        )
    xs = list(steps) if steps is not None else list(range(1, len(losses) + 1))
    raw = [math.nan if _finite(v) is None else float(v) for v in losses]
    smooth = ema(raw, smoothing)

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)

    last = next((v for v in reversed(smooth) if math.isfinite(v)), None)
    full_title = title
    if last is not None:
        last_step = xs[max(i for i, v in enumerate(smooth) if math.isfinite(v))]
        full_title = f"{title}   step {last_step:g}, EMA {last:.4g}"

    loss_bottom = height if validation is None else int(height * 0.58)
    _draw_panel(
        draw,
        (0, 0, width, loss_bottom),
        [
            _Series(xs, raw, RAW_COLOR, 1, "raw"),
            _Series(xs, smooth, SMOOTH_COLOR, 2, f"EMA {smoothing:g}"),
        ],
        title=full_title,
        x_label="step",
        y_label="loss (log)" if log_y else "loss",
        log_y=log_y,
        empty_text="no data yet",
    )
    if validation is not None:
        draw.line((8, loss_bottom, width - 8, loss_bottom), fill=GRID_COLOR)
        name = _METRIC_NAMES.get(validation_metric, validation_metric.upper())
        unit = " (dB)" if validation_metric.startswith("psnr") else ""
        better = ", lower is better" if validation_metric.endswith("mse") else ""
        _draw_panel(
            draw,
            (0, loss_bottom, width, height),
            _validation_series(validation, validation_metric),
            title=f"Validation {name}{unit}: restored vs degraded{better}",
            x_label="step",
            y_label=name,
            log_y=False,
            empty_text="no validation data yet",
        )
    return img
