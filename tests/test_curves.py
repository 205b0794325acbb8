"""Tests for curves.py: the numbers (moving average, ticks) against hand-computed values, which
panels each kind of log gets, and that the PNG shows the data where the axes say it is."""
import json

import numpy as np
import pytest
from PIL import Image

from support import curves


def test_moving_average_by_hand():
    # window 3 over 1, 2, 3, 4, 10: [1, (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4+10)/3]
    assert np.allclose(curves.moving_average([1, 2, 3, 4, 10], 3), [1, 1.5, 2, 3, 17 / 3])
    assert np.allclose(curves.moving_average([5, -1, 2], 1), [5, -1, 2])          # window 1: the data
    assert np.allclose(curves.moving_average([2, 4, 6], 10), [2, 3, 4])           # longer than the data
    with pytest.raises(ValueError):
        curves.moving_average([1, 2], 0)
    assert curves.default_window(1000) == 50 and curves.default_window(200) == 10 and curves.default_window(7) == 1


def test_nice_ticks_by_hand():
    # (0, 1): steps 0.1 / 0.2 / 0.5 / 1 give 11 / 6 / 3 / 2 ticks; 6 is closest to 5
    assert curves.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert curves.nice_ticks(3, 97) == [0, 20, 40, 60, 80, 100]      # 20 -> 6 ticks (10 -> 11, 50 -> 3)
    assert curves.nice_ticks(1, 1000) == [0, 200, 400, 600, 800, 1000]
    assert curves.nice_ticks(0.31, 0.47) == [0.3, 0.35, 0.4, 0.45, 0.5]  # 0.05 -> 5 ticks (0.02 -> 10)
    assert curves.nice_ticks(2.0, 4.0) == [2.0, 2.5, 3.0, 3.5, 4.0]
    # a constant: a range around it, never a division by zero
    t = curves.nice_ticks(2.0, 2.0)
    assert t[0] < 2.0 < t[-1]
    assert curves.tick_label(0.0) == "0" and curves.tick_label(3e-5) == "3e-5" and curves.tick_label(0.25) == "0.25"


def write_log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "lo')  # + a torn last line
    return str(path)


def sft_rows(n=40):
    return [dict(step=s, loss=5.0 / s, lr=1e-3, grad_norm=1.0, loss_tokens=100, tokens=400, epoch=s / n)
            for s in range(1, n + 1)]


def grpo_rows(n=30):
    rows = []
    for s in range(1, n + 1):
        rows.append(dict(step=s, reward=0.5 + 0.75 + 0.1 * 0.4, r_format=0.5, r_accuracy=0.75, r_length=0.4,
                         acc_first=0.4, acc_final=0.5, resp_len=100.0, loss=0.01, kl_old=0.0, clip_frac=0.0,
                         entropy=0.3, grad_norm=1.0, lr=3e-5, sample="<think>x</think>"))
        if s % 10 == 0:
            rows.append(dict(step=s, eval=True, test_first_acc=0.4, test_final_acc=0.5, test_mean_reward=1.0))
    return rows


def titles(section):
    return [p.title for p in section.panels]


def test_panels_per_kind(tmp_path):
    sft = write_log(tmp_path / "base" / "log.jsonl", sft_rows())
    grpo = write_log(tmp_path / "srpo" / "log.jsonl", grpo_rows())
    s_sft, s_grpo = curves.sections_of([sft, grpo])
    assert s_sft.title.startswith("base  (SFT") and s_grpo.title.startswith("srpo  (GRPO")
    assert titles(s_sft)[0].startswith("SFT loss") and len(titles(s_sft)) == 4
    late = s_sft.panels[1].series[0]                      # the zoom: steps 5..40 of 40 (after 40 // 10)
    assert late.steps.tolist() == list(range(5, 41)) and np.allclose(late.values, [5.0 / s for s in range(5, 41)])
    t = titles(s_grpo)
    # the reward, then one panel per component (each r_* field), the GRPO loss on its own panel
    assert t[:4] == ["reward (total, per response)", "reward component: accuracy", "reward component: format",
                     "reward component: length"]
    assert sum(x.startswith("GRPO loss") for x in t) == 1 and not any(x.startswith("SFT loss") for x in t)
    # absent fields (no scene_acc, no kl_ref in this log) make no panel
    assert not any("scene list" in x or "KL to reference" in x for x in t)
    # the component panel holds exactly the logged values; the torn line was skipped
    comp = next(p for p in s_grpo.panels if p.title == "reward component: length").series[0]
    assert comp.steps.tolist() == list(range(1, 31)) and np.allclose(comp.values, 0.4)
    # evaluations (rows with eval: true) are their own sparse series, not mixed into training ones
    ev = next(p for p in s_grpo.panels if p.title.startswith("greedy test accuracy"))
    assert [s.steps.tolist() for s in ev.series] == [[10, 20, 30]] * 2 and not ev.series[0].smooth
    acc = next(p for p in s_grpo.panels if p.title.startswith("accuracy"))
    assert [s.label for s in acc.series] == ["first answer", "final answer"] and len(acc.series[0].steps) == 30


def test_unknown_log_is_an_error(tmp_path):
    p = write_log(tmp_path / "x" / "log.jsonl", [dict(step=1, foo=2.0)])
    with pytest.raises(SystemExit, match="neither"):
        curves.sections_of([p])


def test_png_draws_the_data_where_the_axes_say(tmp_path):
    """One SFT log whose loss is 2.5 for steps 1..50 and 3.5 for 51..100. Ticks: x 0..100,
    y 2.4..3.6 in steps of 0.2 (7 ticks, closest to 5). So the average line is drawn, in the
    series colour, at y = y1 - (2.5 - 2.4) / 1.2 x plot height on the left and at 3.5 on the
    right; right after the jump the 5-step trailing average lies between the two."""
    rows = [dict(step=s, loss=2.5 if s <= 50 else 3.5, lr=1e-3, grad_norm=1.0, loss_tokens=10) for s in range(1, 101)]
    log = write_log(tmp_path / "run" / "log.jsonl", rows)
    out = tmp_path / "c.png"
    curves.main([log, "--out", str(out)])
    img = Image.open(out).convert("RGB")
    assert img.size == (curves.COLS * curves.PANEL_W, curves.SECTION_H + curves.PANEL_H)  # 4 panels: one row
    assert curves.nice_ticks(2.5, 3.5) == [2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6]
    x0, y0 = curves.MARGIN_L, curves.SECTION_H + curves.MARGIN_T
    x1, y1 = curves.PANEL_W - curves.MARGIN_R, curves.SECTION_H + curves.PANEL_H - curves.MARGIN_B
    X = lambda s: round(x0 + s / 100 * (x1 - x0))
    Y = lambda v: y1 - (v - 2.4) / 1.2 * (y1 - y0)
    blue = curves.PALETTE[0]

    def rows_in_colour(x):
        return [y for y in range(y0 + 1, y1) if img.getpixel((x, y)) == blue]
    left, right, jump = rows_in_colour(X(20)), rows_in_colour(X(90)), rows_in_colour(X(52))
    assert left and all(abs(y - Y(2.5)) <= 2 for y in left), (left, Y(2.5))
    assert right and all(abs(y - Y(3.5)) <= 2 for y in right), (right, Y(3.5))
    assert jump and Y(3.5) + 3 < sum(jump) / len(jump) < Y(2.5) - 3
    assert curves.faint((0, 100, 200), keep=0.5) == (127, 177, 227)  # halfway to white
