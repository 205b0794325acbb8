"""
A report a learner opens in a browser: what each response did, item by item, as one HTML file.

    python -m support.report --eval runs/demo/eval/single runs/demo/eval/reflect --out report.html
    python eval.py ... --report FILE.html          # the same page for that evaluation
    python grpo.py ... --report_every N            # a step's rollouts: out/rollouts/stepNNNNNN.html

Per item: the image (a small data-URI thumbnail), the question, the ground truth, and one column
per evaluation (or per rollout sample): the first thinking and answer, the reflection, the second
thinking and answer, each reward component (reward.Score: format, accuracy, I_eff, I_ref, f_len)
and the total, the reflection case as a colour (w2r green, r2w red, ...), every task metric the
evaluation stored (eval.py --metric) and, for rollouts, the group-normalised advantage and whether
the group passed GRPO's accuracy filter. At the top: first and final accuracy, case counts and
metrics per column, the provenance (commit, seeds, checkpoints), the training curves (curves.py's
PNG, embedded: one drawing code for the file and the page) and the file's own size.

    1. items     a record -> its question, ground truth and image thumbnail
    2. cells     a response -> its parts (reward.parse_response) and reward components (reward.Score)
    3. evals     eval.py's metrics.json + predictions JSONL -> items and columns; every response is
                 re-scored with reward.score_batch (predictions store only the total; the recomputed
                 total is checked against the stored one and any difference is shown on the page)
    4. render    the data as one JSON block inside the page; a small inline script draws a page of
                 items at a time (paging: thousands of items stay fast), with filters (the final
                 answer changed, w2r, r2w, the columns disagree, dropped groups) and column toggles
    5. entry     write_eval_report (eval.py, pipeline.py, this file's command line) and
                 write_rollout_report (grpo.py: a step's groups, every sample a column with its advantage)

Safe by construction: model, dataset and teacher strings reach the page only as JSON inside a
<script type="application/json"> block with <, > and & written as \\u escapes, and the script puts
them into the page with textContent, never as markup; Python-rendered parts go through
html.escape. A Content-Security-Policy meta tag allows only inline styles, data: images and the
page's own two scripts (by their sha256), so the page makes no network request at all. Long texts are stored up to MAX_STORED
characters and shown up to SHOW_CHARS with a button that expands them.
"""
import argparse
import base64
import hashlib
import html
import io
import json
import os
import sys
import subprocess
import tempfile
from dataclasses import dataclass, field

import reward
from support import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- knobs

THUMB_PX = 160          # longest side of an embedded image thumbnail
MAX_STORED = 20_000     # characters of one text kept in the file (the rest: "... N more characters")
SHOW_CHARS = 1_200      # characters shown before the "show all" button
PAGE_ITEMS = 20         # items drawn per page: drawing all 300 x 5 cells at once is what makes pages slow
ROLLOUT_GROUPS = 4      # groups of a step shown by grpo.py --report_every
CASE_COLOURS = {"w2r": "#2e9e44", "r2r": "#8cc9f0", "r2w": "#d63a3a", "w2w": "#b0b0b0",
                "single": "#e7d9a8", "none": "#eeeeee"}
COMPONENTS = ["format", "accuracy", "effectiveness", "reflection", "length", "total"]   # reward.Score fields
LABELS = ["format", "accuracy", "I_eff", "I_ref", "f_len", "total"]                     # their names on the page


@dataclass
class Column:
    """One evaluation of the items (a model with a prompt) or one rollout sample."""
    name: str
    note: str = ""                      # e.g. the checkpoint path, "saw the next item's image"
    cells: dict = field(default_factory=dict)   # item id -> cell dict (cell())


@dataclass
class Item:
    id: str
    question: str
    answer: str
    image: str = ""                     # data URI ("" = no image)
    note: str = ""                      # rollouts: the group's advantage statistics and filter verdict
    dropped: bool = False               # rollouts: the group failed the accuracy filter


# ----------------------------------------------------------------------------- 1. items: a record, its image

def question_text(record):
    """The last user turn's text (text parts joined; images are shown separately)."""
    users = [m for m in record.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return str(record.get("question", ""))
    c = users[-1].get("content")
    if isinstance(c, str):
        return c
    return "\n".join(p["text"] for p in c or [] if isinstance(p, dict) and isinstance(p.get("text"), str))


def first_image(record):
    """The record's first image reference (a path relative to its file's folder), or None."""
    for m in record.get("messages") or []:
        for part in m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else []:
            if isinstance(part, dict) and (part.get("type") == "image" or "image" in part):
                return part.get("image")
    return record.get("image")


def thumbnail_uri(path):
    """A small data-URI thumbnail of the image at `path`: PNG or JPEG, whichever is smaller
    (flat synthetic images compress best as PNG, photos as JPEG). "" if it cannot be read."""
    from PIL import Image
    try:
        img = data.load_image(path)
    except (OSError, ValueError):
        return ""
    img.thumbnail((THUMB_PX, THUMB_PX), Image.LANCZOS)
    best = None
    for fmt, mime, kw in (("PNG", "image/png", dict(optimize=True)), ("JPEG", "image/jpeg", dict(quality=80))):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        if best is None or buf.tell() < len(best[1]):
            best = (mime, buf.getvalue())
    return f"data:{best[0]};base64,{base64.b64encode(best[1]).decode()}"


def make_item(record, image_root):
    """A record -> an Item; image paths are relative to image_root (data.load_records' '_root' wins)."""
    ref = first_image(record)
    uri = thumbnail_uri(os.path.join(record.get("_root", image_root), ref)) if isinstance(ref, str) else ""
    return Item(id=str(record.get("id", "?")), question=question_text(record), answer=str(record.get("answer", "")),
                image=uri)


# ----------------------------------------------------------------------------- 2. cells: one response, scored

def cell(text, score: reward.Score, **extra):
    """One response as the page shows it: its parts, the reward's components and the case.
    The raw text is kept only when the parts do not already say all of it (not in an exact format)."""
    p = reward.parse_response(text)
    second_think = p.thinks[-1] if p.is_two_pass and len(p.thinks) >= 2 else ""
    out = dict(case=score.case, c1=bool(score.first_correct), c2=bool(score.final_correct),
               t1=p.first_think, a1=p.answers[0] if p.answers else None, rf=p.reflection,
               t2=second_think, a2=p.answers[-1] if p.is_two_pass else None,
               s=[round(float(getattr(score, k)), 4) for k in COMPONENTS], **extra)
    if not (p.is_two_pass_format or p.is_single_pass_format):
        out["raw"] = text
    return out


def reward_config_of(eval_config):
    """reward.RewardConfig an eval.py run scored with (its --reward_preset; "" = the default)."""
    preset = (eval_config or {}).get("reward_preset") or ""
    return reward.RewardConfig(preset=preset) if preset else reward.RewardConfig()


def count_tokens_of(checkpoint):
    """The checkpoint's tokenizer's token count (what eval.py's f_len used), or None if it cannot
    be read (then reward.default_count_tokens is used and f_len may differ: the page says so)."""
    try:
        return data.Tokenizer.from_dir(checkpoint).count_tokens
    except Exception:  # noqa: BLE001 any reason: fall back, and the page reports the mismatch
        return None


def eval_column(name, preds, records_by_id, rcfg, count_tokens, note=""):
    """eval.py predictions (dicts) -> a Column; each response re-scored with reward.score_batch.
    With n > 1 samples per question the column shows sample 0 and says how many samples were right.
    Returns (column, number of responses whose recomputed total differs from the stored reward)."""
    first = [p for p in preds if p.get("sample", 0) == 0]
    unknown = [p["id"] for p in first if str(p["id"]) not in records_by_id]
    if unknown:
        raise ValueError(f"report: column {name}: prediction ids not in the records: {unknown[:5]}")
    recs = [records_by_id[str(p["id"])] for p in first]
    scores = reward.score_batch([p["response"] for p in first], [r["answer"] for r in recs], "srpo",
                                count_tokens, rcfg, [r.get("options") for r in recs])
    right = {}
    for p in preds:
        right.setdefault(str(p["id"]), []).append(bool(p.get("final_correct")))
    col, off = Column(name, note), 0
    for p, s in zip(first, scores):
        stored = p.get("reward")
        off += stored is not None and abs(float(stored) - s.total) > 1e-6
        pid = str(p["id"])
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in (p.get("metrics") or {}).items()}
        extra = dict(m=shown, L=p.get("length"), fin=p.get("finish"))
        if len(right[pid]) > 1:
            extra["nright"] = f"{sum(right[pid])} of {len(right[pid])} samples right"
        col.cells[pid] = cell(p["response"], s, **extra)
    return col, off


# ----------------------------------------------------------------------------- 3. evaluations: eval.py's folders

def read_eval_dir(eval_dir):
    """An eval.py output folder -> (its config, [(result row, predictions path)])."""
    path = os.path.join(eval_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"report: {path}: missing (the evaluation did not finish)")
    with open(path) as f:
        m = json.load(f)
    out = []
    for k, r in enumerate(m.get("results") or []):
        if not all(key in r for key in ("checkpoint", "dataset")):
            raise ValueError(f"report: {path}: results[{k}] has no 'checkpoint' or 'dataset' (not eval.py's metrics.json)")
        safe = f"{r['checkpoint']}__{r['dataset']}".replace("/", "_").replace(":", "_")
        out.append((r, os.path.join(eval_dir, "predictions", safe + ".jsonl")))
    return m.get("config") or {}, out


def column_name(row, cfg):
    label = cfg.get("prompt", "?") + (", shuffled images" if cfg.get("shuffle_images") else "")
    return f"{row['checkpoint']} ({label})"


def eval_pages(eval_dirs):
    """Every evaluation of every folder, grouped by dataset -> {dataset: (items, columns, notes)}.
    The records come from the --data files named in each metrics.json (benchmarks are skipped:
    their records are not kept as a file)."""
    pages, records, notes = {}, {}, []
    for d in eval_dirs:
        cfg, rows = read_eval_dir(d)
        for path in cfg.get("data") or []:
            name = os.path.splitext(os.path.basename(path))[0]
            if name not in records:
                recs = data.read_jsonl(path)
                records[name] = (recs, os.path.dirname(os.path.abspath(path)))
        rcfg = reward_config_of(cfg)
        for row, pred_path in rows:
            if row["dataset"] not in records:
                notes.append(f"{row['checkpoint']} on {row['dataset']}: no records file (a benchmark), not shown")
                continue
            if not os.path.exists(pred_path):
                raise FileNotFoundError(f"report: {pred_path}: missing (eval.py writes it before metrics.json)")
            preds = data.read_jsonl(pred_path)
            recs, root = records[row["dataset"]]
            by_id = {str(r["id"]): r for r in recs}
            count = count_tokens_of(row.get("path", ""))
            note = "; ".join(filter(None, [row.get("path", ""), "each question was asked with the NEXT item's image "
                                           "(blind control)" if cfg.get("shuffle_images") else ""]))
            col, off = eval_column(column_name(row, cfg), preds, by_id, rcfg, count, note)
            if off:
                notes.append(f"{col.name}: the recomputed reward differs from the stored one for {off} response(s)"
                             + ("" if count else " (no tokenizer at the checkpoint path: f_len counted in words)"))
            items, cols = pages.setdefault(row["dataset"], ({}, []))
            for pid in col.cells:
                if pid not in items:
                    items[pid] = make_item(by_id[pid], root)
            cols.append(col)
    order = {name: [str(r["id"]) for r in recs] for name, (recs, _) in records.items()}
    return {name: ([items[i] for i in order[name] if i in items], cols, notes) for name, (items, cols) in pages.items()}


def summary_rows(columns, items):
    """One summary row per column, computed from its cells (as eval.aggregate does)."""
    rows = []
    for c in columns:
        cells = [c.cells[i.id] for i in items if i.id in c.cells]
        n = max(len(cells), 1)
        row = dict(name=c.name, n=len(cells), first=sum(x["c1"] for x in cells) / n,
                   final=sum(x["c2"] for x in cells) / n, reward=sum(x["s"][-1] for x in cells) / n,
                   cases={k: sum(x["case"] == k for x in cells) for k in CASE_COLOURS})
        names = sorted({k for x in cells for k in x.get("m", {})})
        for k in names:   # a task metric: the mean where it applies (not None)
            vals = [x["m"][k] for x in cells if x.get("m", {}).get(k) is not None]
            row.setdefault("metrics", {})[k] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 4. render

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 16px 40px;color:#222}
h1{font-size:20px;margin:14px 0 4px} h2{font-size:16px;margin:18px 0 6px}
table.sum{border-collapse:collapse;font-variant-numeric:tabular-nums} .sum td,.sum th{border:1px solid #ddd;padding:2px 7px;text-align:right}
.sum td:first-child,.sum th:first-child{text-align:left} .prov{color:#555;font-size:12px;white-space:pre-wrap}
.note{background:#fff4d6;padding:4px 8px;margin:4px 0;border-left:4px solid #e0a800}
.legend span{display:inline-block;padding:1px 8px;margin-right:4px;border-radius:3px}
#bar{position:sticky;top:0;background:#fafafa;border-bottom:1px solid #ccc;padding:6px 0;z-index:2}
#bar label{margin-right:10px} .item{border:1px solid #ccc;border-radius:4px;margin:10px 0;padding:8px}
.head{display:flex;gap:12px;align-items:flex-start} .head img{max-width:160px;cursor:zoom-in;image-rendering:pixelated;border:1px solid #ddd}
.head img.big{max-width:480px;width:480px;cursor:zoom-out} .q{white-space:pre-wrap;flex:1}
.gt{font-weight:600} .cols{display:flex;gap:8px;overflow-x:auto;margin-top:6px}
.cell{flex:1 0 200px;max-width:520px;border-top:6px solid #ccc;background:#fcfcfc;padding:4px 6px;font-size:13px}
.cell h3{font-size:13px;margin:2px 0} .part{margin:3px 0} .part b{color:#555;font-weight:600}
.txt{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,monospace;font-size:12px}
.ok{color:#1a7f37} .bad{color:#c62828} .comp{font-size:12px;margin-top:4px;font-variant-numeric:tabular-nums}
.comp span{display:inline-block;margin-right:8px} .comp i{color:#666} .comp .tot{font-weight:600}
.cell{min-width:0} button.more{font-size:11px;margin-left:4px} .dropped{background:#fff0f0}
"""

# The page's script. It only ever puts data into the page with textContent (never innerHTML).
JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const C = D.colours, COMP = D.components;
let page = 0, shown = D.columns.map(() => true);
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text); return e; }
function longText(s) {           // a text, cut at D.show characters with a button that shows the rest
  const box = el('span', 'txt'); s = String(s);
  if (s.length <= D.show) { box.textContent = s; return box; }
  box.textContent = s.slice(0, D.show) + ' \u2026';
  const b = el('button', 'more', 'show all (' + s.length + ' characters)');
  b.onclick = () => { box.textContent = s; b.remove(); };
  const w = el('span'); w.append(box, b); return w;
}
function part(label, s, mark) {
  const d = el('div', 'part'); d.append(el('b', '', label + ': '));
  if (s === null || s === undefined) { d.append(el('i', '', 'none')); return d; }
  d.append(longText(s)); if (mark !== undefined) d.append(el('span', mark ? 'ok' : 'bad', mark ? ' \u2713' : ' \u2717'));
  return d;
}
function drawCell(col, x) {
  const c = el('div', 'cell'); c.style.borderTopColor = C[x.case] || '#ccc';
  c.append(el('h3', '', col.name + ' \u2014 ' + x.case));
  if (x.adv !== undefined) c.append(el('div', '', 'advantage ' + x.adv.toFixed(3) + (x.keep ? '' : ' (group dropped)')));
  if (x.nright) c.append(el('div', '', x.nright));
  c.append(part('first thinking', x.t1 || null), part('first answer', x.a1, x.a1 === null ? undefined : x.c1));
  if (x.rf !== null && x.rf !== undefined) {
    c.append(part('reflection', x.rf), part('second thinking', x.t2 || null), part('second answer', x.a2, x.c2));
  }
  if (x.raw !== undefined) c.append(part('whole response (not in the exact format)', x.raw));
  const t = el('div', 'comp');                 // the reward's components, then the total
  COMP.forEach((k, i) => { const sp = el('span', k === 'total' ? 'tot' : ''); sp.append(el('i', '', k + ' '), x.s[i].toFixed(3)); t.append(sp); });
  c.append(t);
  const m = Object.entries(x.m || {}).map(([k, val]) => k + ' ' + val).join(', ');
  const extra = [m, x.L !== undefined && x.L !== null ? x.L + ' tokens' : '', x.fin === 'length' ? 'truncated' : ''];
  c.append(el('div', '', extra.filter(Boolean).join(' \u00b7 ')));
  return c;
}
function visibleCells(it) { return D.columns.map((col, j) => shown[j] ? col.cells[it.id] : undefined).filter(Boolean); }
const FILTERS = {
  all: () => true,
  changed: xs => xs.some(x => x.a1 !== null && x.a2 !== null && x.a2 !== undefined && x.a1 !== x.a2),
  w2r: xs => xs.some(x => x.case === 'w2r'), r2w: xs => xs.some(x => x.case === 'r2w'),
  disagree: xs => xs.some(x => x.c2) && xs.some(x => !x.c2),
  dropped: (xs, it) => it.dropped,
};
function selected() { const f = FILTERS[document.getElementById('filter').value];
  return D.items.filter(it => f(visibleCells(it), it)); }
function draw() {
  const list = selected(), pages = Math.max(1, Math.ceil(list.length / D.per));
  page = Math.min(page, pages - 1);
  document.getElementById('count').textContent = list.length + ' of ' + D.items.length + ' items, page ' + (page + 1) + ' of ' + pages;
  const box = document.getElementById('items'); box.replaceChildren();
  for (const it of list.slice(page * D.per, (page + 1) * D.per)) {
    const d = el('div', 'item' + (it.dropped ? ' dropped' : '')), head = el('div', 'head');
    if (it.image) { const im = el('img'); im.src = it.image; im.alt = 'image of ' + it.id; im.onclick = () => im.classList.toggle('big'); head.append(im); }
    const q = el('div', 'q'); q.append(el('div', '', 'item ' + it.id), longText(it.question), el('div', 'gt', 'ground truth: ' + it.answer));
    if (it.note) q.append(el('div', '', it.note));
    head.append(q); d.append(head);
    const cols = el('div', 'cols');
    D.columns.forEach((col, j) => { if (shown[j] && col.cells[it.id]) cols.append(drawCell(col, col.cells[it.id])); });
    d.append(cols); box.append(d);
  }
}
function bar() {
  const t = document.getElementById('toggles');
  D.columns.forEach((col, j) => { const l = el('label'), cb = el('input'); cb.type = 'checkbox'; cb.checked = true;
    cb.onchange = () => { shown[j] = cb.checked; draw(); }; l.append(cb, ' ' + col.name); t.append(l); });
  const f = document.getElementById('filter');   // the filter is kept in the address: #filter=w2r is a link to it
  const want = new URLSearchParams(location.hash.slice(1)).get('filter');
  if (want && FILTERS[want]) f.value = want;
  f.onchange = () => { page = 0; location.hash = 'filter=' + f.value; draw(); };
  document.getElementById('prev').onclick = () => { page = Math.max(0, page - 1); draw(); };
  document.getElementById('next').onclick = () => { page += 1; draw(); };
  if (!D.items.some(it => it.dropped)) document.querySelector('option[value=dropped]').remove();
}
bar(); draw();
document.body.dataset.renderMs = performance.now().toFixed(0);
document.body.dataset.itemsDrawn = document.querySelectorAll('.item').length;
"""

# The first script of the page: records errors (uncaught, console.error, blocked requests) in the DOM,
# so a headless browser's --dump-dom shows them.
ERRORS_JS = r"""
window.__errors = [];
window.addEventListener('error', e => __errors.push('error: ' + e.message));
document.addEventListener('securitypolicyviolation', e => __errors.push('blocked: ' + e.blockedURI));
const __ce = console.error; console.error = (...a) => { __errors.push('console: ' + a.join(' ')); __ce(...a); };
window.addEventListener('load', () => { document.body.dataset.errors = JSON.stringify(__errors); });
"""



def script_hash(js):
    return "'sha256-" + base64.b64encode(hashlib.sha256(js.encode()).digest()).decode() + "'"


# The page's policy: no request leaves it (default-src 'none'), images only from data: URIs, and only
# the page's own two scripts run (by hash): even a string that got past the escaping could not execute.
CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src {script_hash(ERRORS_JS)} {script_hash(JS)}")


def clip(s):
    """A text as stored in the page: at most MAX_STORED characters, the cut said at its end."""
    if not isinstance(s, str) or len(s) <= MAX_STORED:
        return s
    return s[:MAX_STORED] + f"\n... {len(s) - MAX_STORED} more characters not stored in this report"


def script_json(obj):
    """JSON that can sit inside <script type="application/json">: no <, > or & in it, so no text
    (</script>, <!--) can end or change the block."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def page_data(items, columns):
    cells = lambda c: {i: {k: clip(v) for k, v in x.items()} for i, x in c.cells.items()}
    return dict(colours=CASE_COLOURS, components=LABELS, show=SHOW_CHARS, per=PAGE_ITEMS,
                items=[dict(id=i.id, question=clip(i.question), answer=clip(i.answer), image=i.image, note=i.note,
                            dropped=i.dropped) for i in items],
                columns=[dict(name=c.name, note=c.note, cells=cells(c)) for c in columns])


def summary_html(rows):
    e = html.escape
    metrics = sorted({k for r in rows for k in r.get("metrics", {})})
    head = ["column", "n", "first acc", "final acc", *CASE_COLOURS, "mean reward", *metrics]
    out = ["<table class='sum'><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        vals = [r["name"], r["n"], f"{r['first']:.3f}", f"{r['final']:.3f}", *(r["cases"][k] for k in CASE_COLOURS),
                f"{r['reward']:.3f}", *("-" if r.get("metrics", {}).get(k) is None else f"{r['metrics'][k]:.3f}"
                                        for k in metrics)]
        out.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in vals) + "</tr>")
    return "\n".join(out) + "</table>"


def render(title, items, columns, provenance, notes=(), curves_png=None, summary=None):
    """The whole page as a string. provenance: {label: value}; curves_png: PNG bytes or None;
    summary: the rows of summary_rows (default: one per column)."""
    e = html.escape
    summary = summary if summary is not None else summary_rows(columns, items)
    legend = "".join(f"<span style='background:{c}'>{e(k)}</span>" for k, c in CASE_COLOURS.items())
    prov = "\n".join(f"{e(str(k))}: {e(str(v))}" for k, v in provenance.items())
    cols = "".join(f"<li>{e(c.name)}: {e(c.note)}</li>" for c in columns if c.note)
    # folded: the items are what the page is for; the curves are one click away
    curves = ("<details><summary><b>training curves</b> (curves.py)</summary><img alt='training curves' "
              "style='max-width:100%' src='data:image/png;base64," + base64.b64encode(curves_png).decode()
              + "'></details>") if curves_png else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(title)}</title><script>{ERRORS_JS}</script><style>{CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<div class="prov">{prov}
file size: __SIZE__</div>
{''.join(f'<div class="note">{e(n)}</div>' for n in notes)}
<h2>summary</h2>{summary_html(summary)}
<div class="legend">reflection case (first answer -> final answer, w = wrong, r = right): {legend}</div>
<div class="prov">reward components (reward.py): format R_format, accuracy R_accuracy, I_eff the reflection's
effectiveness (w2r pays most, r2w is penalised), I_ref a proper reflection, f_len the length reward
(total = the others + length_weight x f_len); a second answer exists only after a reflection.</div>
<ul class="prov">{cols}</ul>
{curves}
<h2>items</h2>
<div id="bar"><span id="toggles"></span><br>
<label>show <select id="filter">
<option value="all">all items</option>
<option value="changed">the final answer differs from the first (a shown column)</option>
<option value="w2r">a shown column went wrong -> right</option>
<option value="r2w">a shown column went right -> wrong</option>
<option value="disagree">shown columns disagree: one right, another wrong</option>
<option value="dropped">groups dropped by the accuracy filter</option>
</select></label>
<button id="prev">previous</button> <button id="next">next</button> <span id="count"></span></div>
<noscript>The items are drawn by the page's inline script: enable JavaScript.</noscript>
<div id="items"></div>
<script id="data" type="application/json">{script_json(page_data(items, columns))}</script>
<script>{JS}</script>
</body></html>
"""
    size = len(body.encode())
    return body.replace("__SIZE__", f"{size / 1e6:.2f} MB ({len(items)} items x {len(columns)} columns)", 1)


def write_page(path, page):
    """Write atomically (a reader never sees half a page)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def curves_of(logs):
    """PNG bytes of curves.py's drawing of these log.jsonl files (None when there are none)."""
    logs = [p for p in logs if os.path.exists(p)]
    if not logs:
        return None
    from support import curves
    with tempfile.TemporaryDirectory() as d:
        curves.draw(curves.sections_of(logs), os.path.join(d, "curves.png"))
        with open(os.path.join(d, "curves.png"), "rb") as f:
            return f.read()


def git_commit(cwd=ROOT):
    """HEAD's hash, with '+ uncommitted changes' when tracked files differ from it; 'unknown'
    outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


# ----------------------------------------------------------------------------- 5. entry points

def write_eval_report(out_path, eval_dirs, provenance=None, curves_png=None, title="SRPO evaluation"):
    """eval.py output folders -> one page per dataset: out_path for the first (or only) one,
    out_path's name + '__DATASET.html' for the others. Returns the paths written."""
    pages = eval_pages(eval_dirs)
    if not pages:
        raise ValueError(f"report: nothing to show in {eval_dirs} (no evaluation of a records file)")
    cfgs = [read_eval_dir(d)[0] for d in eval_dirs]
    prov = dict(commit=git_commit(), **(provenance or {}))
    prov.setdefault("seed", ", ".join(sorted({str(c.get("seed", "?")) for c in cfgs})))
    prov["evaluations"] = ", ".join(os.path.abspath(d) for d in eval_dirs)
    written = []
    for k, (name, (items, cols, notes)) in enumerate(pages.items()):
        path = out_path if k == 0 else os.path.splitext(out_path)[0] + f"__{name}.html"
        page = render(f"{title}: {name}", items, cols, dict(prov, dataset=name), notes, curves_png)
        written.append(write_page(path, page))
        print(f"[report] {path}: {len(items)} items x {len(cols)} columns, {os.path.getsize(path) / 1e6:.2f} MB",
              file=sys.stderr)
    return written


def write_rollout_report(out_path, roll, step, image_root, cfg, groups=ROLLOUT_GROUPS):
    """grpo.py: the first `groups` groups of a step's Rollout (this rank's share), every sample a
    column with its advantage; each group says its reward mean and spread and the filter's verdict."""
    G, items, cols = roll.group_size, [], [Column(f"sample {j}") for j in range(roll.group_size)]
    for g in range(min(groups, len(roll.records))):
        rows = range(g * G, (g + 1) * G)
        rec, sc = roll.records[g], [roll.scores[i] for i in rows]
        r = [s.total for s in sc]
        mean = sum(r) / G
        std = (sum((x - mean) ** 2 for x in r) / max(G - 1, 1)) ** 0.5
        acc = sum(s.filter_accuracy for s in sc) / G
        kept = bool(roll.keep[g * G])
        verdict = ("kept" if kept else f"DROPPED (not trained on): {acc:.3f} is outside [{cfg.acc_low}, {cfg.acc_high}], "
                   f"the samples are all right or all wrong alike: nothing to compare") if cfg.filter_groups \
            else "kept (filter off)"
        it = make_item(rec, image_root)
        it.id = f"{g}:{it.id}"     # a prompt can come twice in one step
        it.note = (f"group {g}: reward mean {mean:.3f}, std {std:.3f}; advantage = (reward - mean) / (std + eps); "
                   f"accuracy filter (mean of accuracy + I_eff) {acc:.3f}: {verdict}")
        it.dropped = not kept
        items.append(it)
        for j, i in enumerate(rows):
            cols[j].cells[it.id] = cell(roll.texts[i], roll.scores[i], adv=round(float(roll.adv[i]), 4), keep=kept,
                                        L=int(roll.lengths[i]), fin=roll.finish_reasons[i])
    every = [c for col in cols for c in col.cells.values()]
    n = max(len(every), 1)
    summary = [dict(name=f"step {step}: {len(items)} groups x {G} samples", n=len(every),
                    first=sum(x["c1"] for x in every) / n, final=sum(x["c2"] for x in every) / n,
                    reward=sum(x["s"][-1] for x in every) / n, cases={k: sum(x["case"] == k for x in every)
                                                                    for k in CASE_COLOURS})]
    prov = dict(commit=git_commit(), step=step, seed=cfg.seed, model=cfg.model, out=cfg.out, reward=cfg.reward,
                shown=f"the first {len(items)} of this rank's {len(roll.records)} groups")
    return write_page(out_path, render(f"GRPO rollouts, step {step}", items, cols, prov, curves_png=None,
                                       summary=summary))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the HTML report of eval.py evaluations", allow_abbrev=False)
    ap.add_argument("--eval", nargs="+", required=True, metavar="DIR", help="eval.py --out folders, shown side by side")
    ap.add_argument("--out", required=True, help="the HTML file to write")
    ap.add_argument("--logs", nargs="*", default=[], help="log.jsonl files whose curves the page shows")
    a = ap.parse_args(argv)
    try:
        write_eval_report(a.out, a.eval, curves_png=curves_of(a.logs))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
