"""
Training curves a learner can read, from the log.jsonl files that sft.py and grpo.py write:

    python -m support.curves runs/demo/base/log.jsonl runs/demo/sft/log.jsonl runs/demo/srpo/log.jsonl --out curves.png

One section per log (its run name and kind as a header), one panel per quantity. In each panel
the raw per-step values are drawn faint and their trailing moving average on top, with "nice"
ticks (1, 2, 5 x 10^k) on both axes, a grid, the step axis labelled and the quantity's unit in
the panel title. Which panels a log gets depends on its kind:

    SFT   (sft.py: has "loss_tokens")  loss, learning rate, gradient norm
    GRPO  (grpo.py: has "reward")      the reward, then each of its components (every "r_*"
                                       field: format, accuracy, length...), accuracy (first and
                                       final answer), scene list accuracy, response length, the
                                       GRPO loss, KL, clip fraction, entropy, gradient norm, and
                                       the greedy test evaluations if the run made any

An SFT loss (cross-entropy, nats per token) and a GRPO loss (clipped surrogate + beta x KL) are
different quantities, so they never share an axis: every panel belongs to one log. Only pillow
and numpy are used, so it runs wherever the training does.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
PANEL_W, PANEL_H, COLS = 420, 270, 4
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 44, 40   # room for y ticks, title + legend, x ticks + label
SECTION_H = 34


@dataclass
class Series:
    label: str
    steps: np.ndarray
    values: np.ndarray
    color: tuple
    smooth: bool = True     # False: few points (evaluations), drawn as markers joined by a line


@dataclass
class Panel:
    title: str              # quantity and unit
    series: list = field(default_factory=list)


@dataclass
class Section:
    title: str
    panels: list


# ----------------------------------------------------------------------------- numbers

def moving_average(values, window):
    """Trailing mean: out[i] = mean(values[max(0, i - window + 1) : i + 1]) (the first
    window - 1 points average what there is so far, so the curve starts at the first value)."""
    v = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"moving_average: window must be >= 1, got {window}")
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo = np.maximum(0, i - window + 1)
    return (c[i + 1] - c[lo]) / (i + 1 - lo)


def default_window(n):
    """Moving-average window for n points: 1/20 of the run (at least 1), so a 1000-step run
    averages 50 steps and a 200-step run 10."""
    return max(1, n // 20)


def nice_ticks(lo, hi, target=5):
    """Tick values covering [lo, hi] at a step of 1, 2 or 5 x 10^k, the number of ticks closest
    to `target`. E.g. (0, 1) -> 0, 0.2, ..., 1.0; (3, 97) -> 0, 20, ..., 100."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks: non-finite range {lo}, {hi}")
    if hi <= lo:
        lo, hi = lo - 0.5 * max(abs(lo), 1.0), hi + 0.5 * max(abs(hi), 1.0)
    mag = 10.0 ** math.floor(math.log10((hi - lo) / max(1, target - 1)))

    def span(step):  # first and last tick index of a step
        return math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    # the 1/2/5 x 10^k step whose number of ticks is closest to target
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda st: abs(span(st)[1] - span(st)[0] + 1 - target))
    first, last = span(step)
    return [round(k * step, 12) for k in range(first, last + 1)]


def tick_label(v):
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.6g}"


# ----------------------------------------------------------------------------- logs -> panels

def read_rows(path):
    """The JSON rows of a log; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def series_of(rows, key, label, color, smooth=True):
    """(step, value) of every row with a finite number under key, or None if there is none."""
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    if not pts:
        return None
    s, v = zip(*pts)
    return Series(label, np.asarray(s, dtype=float), np.asarray(v, dtype=float), color, smooth)


def panel(title, rows, keys, smooth=True):
    """A panel of keys = [(field, legend label)]; None when the log has none of them."""
    p = Panel(title)
    for j, (key, label) in enumerate(keys):
        s = series_of(rows, key, label, PALETTE[j % len(PALETTE)], smooth)
        if s is not None:
            p.series.append(s)
    return p if p.series else None


def sft_panels(rows):
    # the loss again without its first 10% of steps: from scratch it falls from ~6 to ~1 early,
    # which squeezes the later part (where the base model learns to read the image) flat
    last = max((r.get("step", 0) for r in rows), default=0)
    late = [r for r in rows if r.get("step", 0) > last // 10]
    return [panel("SFT loss (cross-entropy, nats/token)", rows, [("loss", "loss")]),
            panel("SFT loss after the first 10% of steps", late, [("loss", "loss")]),
            panel("learning rate", rows, [("lr", "lr")], smooth=False),
            panel("gradient norm (before clipping)", rows, [("grad_norm", "grad norm")])]


def grpo_panels(rows):
    train = [r for r in rows if not r.get("eval")]
    evals = [r for r in rows if r.get("eval")]
    components = sorted({k for r in train for k in r if k.startswith("r_")})
    out = [panel("reward (total, per response)", train, [("reward", "total")])]
    out += [panel(f"reward component: {k[2:]}", train, [(k, k[2:])]) for k in components]
    out += [panel("accuracy (training samples)", train, [("acc_first", "first answer"), ("acc_final", "final answer")]),
            panel("scene list exact (share)", train, [("scene_acc", "scene list")]),
            panel("response length (tokens)", train, [("resp_len", "length")]),
            panel("GRPO loss (surrogate + beta x KL)", train, [("loss", "loss")]),
            panel("KL to reference (k3, per token)", train, [("kl_ref", "KL ref")]),
            panel("KL to rollout policy (per token)", train, [("kl_old", "KL old")]),
            panel("clipped share of tokens", train, [("clip_frac", "clipped")]),
            panel("entropy (nats/token)", train, [("entropy", "entropy")]),
            panel("gradient norm", train, [("grad_norm", "grad norm")]),
            panel("greedy test accuracy (evaluations)", evals,
                  [("test_first_acc", "first answer"), ("test_final_acc", "final answer")], smooth=False)]
    return out


def sections_of(paths):
    """One Section per log, named by its run directory; the kind decides the panels."""
    sections = []
    for path in paths:
        rows = read_rows(path)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        if any("loss_tokens" in r for r in rows):
            kind, panels = "SFT", sft_panels(rows)
        elif any("reward" in r for r in rows):
            kind, panels = "GRPO", grpo_panels(rows)
        else:
            raise SystemExit(f"curves.py: {path}: neither an sft.py log (loss_tokens) nor a grpo.py log (reward)")
        panels = [p for p in panels if p is not None]
        if panels:
            sections.append(Section(f"{name}  ({kind}, {path})", panels))
    if not sections:
        raise SystemExit(f"curves.py: nothing to draw in {paths}")
    return sections


# ----------------------------------------------------------------------------- drawing

def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def faint(color, keep=0.3):
    """The colour mixed with white (keep = share of the colour): raw per-step values."""
    return tuple(int(255 - keep * (255 - c)) for c in color)


def draw_panel(d, p: Panel, x, y, f_small, f_title):
    """Panel p with its top-left corner at (x, y)."""
    x0, y0 = x + MARGIN_L, y + MARGIN_T                                   # plot area
    x1, y1 = x + PANEL_W - MARGIN_R, y + PANEL_H - MARGIN_B
    steps = np.concatenate([s.steps for s in p.series])
    vals = np.concatenate([s.values for s in p.series])
    xt, yt = nice_ticks(steps.min(), steps.max()), nice_ticks(vals.min(), vals.max())
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]
    X = lambda s: x0 + (s - xlo) / (xhi - xlo) * (x1 - x0)
    Y = lambda v: y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)
    d.text((x + 8, y + 6), p.title, fill="black", font=f_title)
    for v in yt:                                                          # grid + y ticks
        d.line([(x0, Y(v)), (x1, Y(v))], fill=(232, 232, 232))
        d.line([(x0 - 4, Y(v)), (x0, Y(v))], fill="black")
        lab = tick_label(v)
        d.text((x0 - 6 - d.textlength(lab, font=f_small), Y(v) - 6), lab, fill="black", font=f_small)
    for s in xt:                                                          # x ticks
        d.line([(X(s), y1), (X(s), y1 + 4)], fill="black")
        lab = tick_label(s)
        d.text((X(s) - d.textlength(lab, font=f_small) / 2, y1 + 5), lab, fill="black", font=f_small)
    d.text(((x0 + x1) / 2 - 12, y1 + 20), "step", fill="black", font=f_small)
    for s in p.series:
        pts = [(X(a), Y(b)) for a, b in zip(s.steps, s.values)]
        if s.smooth and len(pts) > 2:
            d.line(pts, fill=faint(s.color), width=1)
            ma = moving_average(s.values, default_window(len(s.values)))
            d.line([(X(a), Y(b)) for a, b in zip(s.steps, ma)], fill=s.color, width=2)
        else:
            if len(pts) > 1:
                d.line(pts, fill=s.color, width=2)
            if len(pts) <= 30:  # sparse points (evaluations): mark each one
                for px, py in pts:
                    d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=s.color)
    d.rectangle([x0, y0, x1, y1], outline="black")                        # frame over the data's edges
    lx = x1                                                               # legend: title row, right-aligned
    for s in reversed(p.series):
        text = s.label + (f" (avg {default_window(len(s.values))})" if s.smooth and len(s.values) > 2 else "")
        lx -= d.textlength(text, font=f_small)
        d.text((lx, y + 24), text, fill=s.color, font=f_small)
        d.rectangle([lx - 16, y + 29, lx - 4, y + 32], fill=s.color)
        lx -= 26


def draw(sections, out_png):
    """All sections, top to bottom, COLS panels a row -> out_png."""
    rows_of = [math.ceil(len(s.panels) / COLS) for s in sections]
    height = sum(SECTION_H + r * PANEL_H for r in rows_of)
    img = Image.new("RGB", (COLS * PANEL_W, height), "white")
    d = ImageDraw.Draw(img)
    f_small, f_title, f_head = font(11), font(13), font(16)
    y = 0
    for sec, nrow in zip(sections, rows_of):
        d.rectangle([0, y, COLS * PANEL_W, y + SECTION_H - 6], fill=(240, 240, 245))
        d.text((10, y + 6), sec.title, fill="black", font=f_head)
        y += SECTION_H
        for i, p in enumerate(sec.panels):
            draw_panel(d, p, (i % COLS) * PANEL_W, y + (i // COLS) * PANEL_H, f_small, f_title)
        y += nrow * PANEL_H
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    img.save(out_png)
    return img.size


def main(argv=None):
    ap = argparse.ArgumentParser(description="Draw training curves from sft.py / grpo.py log.jsonl files")
    ap.add_argument("logs", nargs="+", help="log.jsonl files (one section each, in this order)")
    ap.add_argument("--out", required=True, help="PNG file to write")
    a = ap.parse_args(argv)
    sections = sections_of(a.logs)
    size = draw(sections, a.out)
    print(f"[curves] wrote {a.out} ({size[0]}x{size[1]}, {sum(len(s.panels) for s in sections)} panels)")


if __name__ == "__main__":
    main()
