"""Evaluate checkpoints: what does reflection buy?

For each checkpoint x dataset, generate one (greedy, the default) or n (sampled, pass@k)
responses per question with sampler.generate_texts, score each with reward.py and report:

    first  accuracy of the first <answer>       final  accuracy of the last <answer>
    w2r r2r r2w w2w   reflection cases (wrong->right, ...)   single / none   one answer / no answer
    format  fraction in the prompt's format      len  mean response length in tokens (incl. the eos)
    NAME    each --metric MODULE:FUNCTION: FUNCTION(record, response_text) -> True | False | a share
            in [0, 1] | None, averaged over the responses where it is not None (e.g. --metric demo.task:scene_list_ok:
            share of responses whose first scene list is exactly the image's)

as a table on stdout (n = questions; case columns count responses, n per question when sampling),
metrics.json + one predictions JSONL per (checkpoint, dataset) in --out. metrics.json is written
only when every checkpoint and dataset is done (its presence means "complete"; a stale one is
removed first), and every checkpoint is checked before any work starts. Every record is checked
before the first batch (data.validate_records under each checkpoint's tokenizer): a bad one (an
unreadable image, a control token, NaN, ...) is reported with file:line and not scored, the rest
are (metrics.json: skipped_bad_record and each result's bad_records); predictions are strict JSON.
--report FILE.html also writes the results item by item, the checkpoints side by side, as one HTML
page (support/report.py).

Datasets: project JSONL files (--data, e.g. the built-in task's test.jsonl) and benchmarks read
from local files in their published formats (--bench NAME=PATH, see benchmarks.py).

    python eval.py --model runs/base runs/srpo --data runs/task/test.jsonl --prompt reflect --out runs/eval \\
        --metric demo.task:scene_list_ok
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from support import answers
from support import benchmarks
from support import cli
from support import data
from support import hf_checkpoint
from support.config import load_function, parse_config

CASES = ["w2r", "r2r", "r2w", "w2w", "single", "none"]


@dataclass
class EvalConfig:
    model: list[str] = field(default_factory=list)   # checkpoint directories (config.json, model.safetensors, tokenizer.json)
    data: list[str] = field(default_factory=list)    # project JSONL files (e.g. the built-in task's test.jsonl)
    bench: list[str] = field(default_factory=list)   # NAME=PATH, NAME in mathvista, mathverse, mathvision, mmmu_pro
    out: str = ""                 # output directory: metrics.json, predictions/, bench_images/
    metric: list[str] = field(default_factory=list)  # MODULE:FUNCTION, FUNCTION(record, response_text) -> bool | float in [0, 1] | None
    prompt: str = "reflect"       # system prompt: "reflect" (two-pass SRPO format) or "single"
    max_new_tokens: int = 256
    batch_size: int = 8           # prompts per sampler call
    n: int = 1                    # samples per question (pass@k); 1 = greedy unless temperature > 0
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    limit: int = 0                # first `limit` records per dataset (0 = all)
    shuffle_images: bool = False  # blind control: each question gets the next record's image(s)
    reward_preset: str = ""       # reward.RewardConfig(preset=...): paper | code; "" = reward.py's default
    device: str = ""              # default: cuda if available, else cpu
    max_pixels: int = 0           # images: 0 = each checkpoint's preprocessor_config.json (else 28*28*1280); > 0 overrides
    report: str = ""              # FILE.html: also the HTML report of this evaluation (one page per --data file: FILE, FILE__NAME.html)


@dataclass
class Response:
    """One generated response: its text (without the final eos), its length in tokens (with it),
    and why it ended ("stop": an eos, "length": max_new_tokens)."""
    text: str
    length: int
    finish: str


@dataclass
class Prediction:
    """One scored response, as written to predictions/<checkpoint>__<dataset>.jsonl."""
    id: str
    sample: int                   # 0..n-1 within its question
    answer: str                   # the ground truth
    response: str
    first_answer: str | None
    final_answer: str | None
    first_correct: bool
    final_correct: bool
    case: str                     # one of CASES
    format_ok: bool               # in the format the prompt asked for
    reward: float                 # SRPO reward (reward.score_batch mode "srpo")
    length: int
    finish: str
    metrics: dict = field(default_factory=dict)  # --metric name -> True | False | None


@dataclass
class Metric:
    """A task-specific per-response check passed in on the command line (--metric MODULE:FUNCTION)."""
    name: str
    fn: object                    # fn(record, response_text) -> bool | None (None: does not apply)


@dataclass
class Dataset:
    name: str
    records: list
    image_root: str               # image paths of the records are relative to this
    skipped: int = 0              # records dropped for an unreadable ground truth
    path: str = ""                # the file it was read from
    bad: list = field(default_factory=list)   # [(where, reason)]: records dropped by data.validate_records


# ----------------------------------------------------------------------------- datasets

def read_project_jsonl(path, bad=None):
    """Records of a project JSONL file, each with source = file:line; ids must be unique. bad: a
    list: a line that is not a JSON object, or a record without a usable id / answer or with an id
    seen before, is appended as (where, reason) and skipped instead of raised."""
    recs, seen, problems = [], {}, []
    for where, r in data.read_jsonl_numbered(path, errors=problems if bad is not None else None):
        try:
            for key in ("id", "answer"):
                v = r.get(key)
                if isinstance(v, bool) or not isinstance(v, (str, int, float)) or str(v).strip() == "":
                    raise ValueError(f"{where}: field '{key}' missing, empty or not a string/number")
            rid = str(r["id"])
            if rid in seen:
                raise ValueError(f"{where}: duplicate id {rid!r} (first at {seen[rid]})")
        except ValueError as e:
            if bad is None:
                raise
            problems.append((where, str(e).removeprefix(f"{where}: ")))
            continue
        seen[rid] = where
        recs.append(dict(r, source=where))
    if not recs and not problems:
        raise ValueError(f"{path}: no records (empty file)")
    if bad is not None:
        bad += problems
    return recs


def load_datasets(data_paths, benches, cache_dir, limit):
    """-> list[Dataset]: the project files, then the benchmarks."""
    out = []
    for path in data_paths:
        name = os.path.splitext(os.path.basename(path))[0]
        bad = []   # kept for drop_bad_records, which reports them with the rest
        out.append(Dataset(name, read_project_jsonl(path, bad), os.path.dirname(os.path.abspath(path)), path=path, bad=bad))
    for spec in benches:
        name, _, path = spec.partition("=")
        if name not in benchmarks.LOADERS or not path:
            raise SystemExit(f"--bench {spec!r}: expected NAME=PATH with NAME in {sorted(benchmarks.LOADERS)}")
        recs = benchmarks.LOADERS[name](path, os.path.join(cache_dir, name))
        out.append(Dataset(name, recs, os.path.dirname(os.path.abspath(path)), path=path))
    for d in out:
        if limit and len(d.records) > limit:   # bad lines after the last record used do not count
            last = data.line_of(d.records[limit - 1].get("source", ""))
            d.records, d.bad = d.records[:limit], [b for b in d.bad if data.line_of(b[0]) < last]
    return out


def with_next_images(records):
    """Blind control: record i keeps its question but gets the image(s) of record i+1 (cyclic). A
    model that reads the image falls toward chance; one that answers from the text alone does not."""
    def images(r):
        return [p for m in r["messages"] if isinstance(m.get("content"), list) for p in m["content"]
                if isinstance(p, dict) and p.get("type") == "image"]
    out = []
    for i, r in enumerate(records):
        r = json.loads(json.dumps(r))  # deep copy
        nxt = records[(i + 1) % len(records)]
        mine, theirs = images(r), images(nxt)
        if len(mine) != len(theirs):
            raise ValueError(f"--shuffle-images: record {r.get('id')} has {len(mine)} image(s), "
                             f"the next record {nxt.get('id')} has {len(theirs)}")
        for part, other in zip(mine, theirs):
            part["image"] = other["image"]
        out.append(r)
    return out


def check_answers(name, records):
    """Drop (and report) records whose ground truth reward.py cannot parse: never a free reward."""
    good, bad = [], []
    for r in records:
        where = r.get("source", f"{name}: record {r.get('id')}")
        benchmarks.field(r, "answer", where)
        try:
            answers.check_ground_truth(r["answer"], r.get("options"), where=where)
            good.append(r)
        except ValueError as e:
            bad.append(f"{r.get('id')}: {e}")
    if bad:
        print(f"[eval] {name}: {len(bad)} record(s) with an unparsable answer skipped, e.g. {bad[:3]}", file=sys.stderr)
    return good, bad


def drop_bad_records(datasets, tokenizers, system_prompt, prog="eval.py", skip=True, quiet=False):
    """Check every record before the first batch (data.validate_records on the prompt it is given:
    fields, NaN / Infinity, control tokens, length and token caps under every tokenizer, images
    opened and checked to decode): bad ones leave d.records for d.bad, reported on stderr, so one
    bad record costs its own score, not the evaluation. skip=False (grpo.py without
    --skip_bad_records) refuses them instead; a data set left with no record raises data.BadRecords."""
    for d in datasets:
        pairs = [(r.get("source") or f"{d.name}: record {r.get('id')}", r) for r in d.records]
        if d.records or d.bad:
            cache, bad = {}, list(d.bad)
            for tok in tokenizers:   # a record must encode under every checkpoint's tokenizer
                pairs, bad = data.validate_records(
                    pairs, d.path or d.name, tok, messages=lambda r, where: data.prompt_messages(r, system_prompt, where),
                    image_root=d.image_root, add_generation_prompt=True, skip_bad=skip, bad=bad, quiet=True,
                    image_cache=cache)
            d.records, d.bad = [r for _, r in pairs], bad
        if d.bad and not quiet:
            print(f"[{prog}] {d.name}: {len(d.bad)} bad record(s) skipped, not scored:\n  " +
                  "\n  ".join(f"{w}: {why}" for w, why in d.bad[:data.MAX_LISTED]) +
                  (f"\n  ... and {len(d.bad) - data.MAX_LISTED} more" if len(d.bad) > data.MAX_LISTED else ""),
                  file=sys.stderr, flush=True)


def checkpoint_tokenizers(ckpts, max_pixels):
    """The distinct (tokenizer, image settings) of the checkpoints, each loaded once."""
    import hashlib
    out = {}
    for ckpt in ckpts:
        try:
            tok = data.Tokenizer.from_dir(ckpt)
            tok.image_cfg = hf_checkpoint.image_config(ckpt, max_pixels)
            with open(tok.path, "rb") as f:
                out.setdefault((hashlib.sha256(f.read()).hexdigest(), repr(tok.image_cfg)), tok)
        except Exception as e:
            raise SystemExit(f"eval.py: --model {ckpt}: cannot load: {type(e).__name__}: {e}") from None
    return list(out.values())


# ----------------------------------------------------------------------------- generation and scoring

def generate_responses(model, tok, records, image_root, cfg) -> list[Response]:
    """cfg.n responses per record, prompt-major, through sampler.generate_texts."""
    import sampler
    sys_prompt = data.SYSTEM_PROMPT_REFLECT if cfg.prompt == "reflect" else data.SYSTEM_PROMPT_SINGLE
    greedy = cfg.temperature <= 0
    scfg = sampler.SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature if not greedy else 1.0,
                                top_p=cfg.top_p, greedy=greedy, n=cfg.n, seed=cfg.seed)
    prompts = []
    for r in records:
        where = r.get("source", f"record {r.get('id')}")
        prompts.append(data.encode_messages(data.prompt_messages(r, sys_prompt, where), tok, image_root,
                                            add_generation_prompt=True, where=where))
    g = sampler.generate_texts(model, tok, prompts, scfg, batch_size=cfg.batch_size, progress=True)
    return [Response(text, int(n), finish) for text, n, finish in zip(g.texts, g.lengths.tolist(), g.finish_reasons)]


def score_predictions(records, gens, cfg, count_tokens, reward_cfg=None, metrics=()) -> list[Prediction]:
    """records (P), gens: list[Response] (P*n, prompt-major) -> per-sample Predictions, scored with
    reward.py and with every Metric."""
    import reward
    rcfg = reward_cfg or reward.RewardConfig()
    n = len(gens) // max(len(records), 1)
    assert n * len(records) == len(gens), f"{len(gens)} responses for {len(records)} records"
    texts = [g.text for g in gens]
    gts = [records[i // n]["answer"] for i in range(len(gens))]
    opts = [records[i // n].get("options") for i in range(len(gens))]
    srpo = reward.score_batch(texts, gts, mode="srpo", count_tokens=count_tokens, cfg=rcfg, options=opts)
    preds = []
    for i, (g, s) in enumerate(zip(gens, srpo)):
        p = reward.parse_response(g.text)
        # format compliance is judged against the format the prompt asked for
        format_ok = p.is_two_pass_format if cfg.prompt == "reflect" else p.is_single_pass_format
        rec = records[i // n]
        preds.append(Prediction(
            id=rec["id"], sample=i % n, answer=rec["answer"], response=g.text,
            first_answer=(p.answers[0] if p.is_two_pass else p.answers[-1]) if p.answers else None,
            final_answer=p.answers[-1] if p.answers else None,
            first_correct=bool(s.first_correct), final_correct=bool(s.final_correct),
            case=s.case, format_ok=format_ok, reward=float(s.total), length=g.length, finish=g.finish,
            metrics={m.name: run_metric(m, rec, g.text) for m in metrics}))
    return preds


def run_metric(metric, record, text):
    value = metric.fn(record, text)
    ok = value is None or isinstance(value, bool) or (isinstance(value, float) and 0.0 <= value <= 1.0)
    if not ok:
        raise TypeError(f"--metric {metric.name}: must return True, False, a float in [0, 1] or None, got "
                        f"{value!r:.40} (record {record.get('id')})")
    return value


def evaluate_model(model, tok, dataset, cfg, reward_cfg=None, metrics=(), rank=0, world_size=1) -> list[Prediction]:
    """One model in memory on one Dataset -> its scored predictions (prompt-major, cfg.n per record).
    With world_size > 1 (grpo.py's in-run evaluation under torchrun, called on every rank) each rank
    generates for its block of records and every rank gets all the predictions. The blocks are
    padded to one size: every rank must make the same number of sampler calls, because each call
    all-gathers an FSDP-sharded model (sampler.unsharded)."""
    records, per = dataset.records, -(-len(dataset.records) // world_size)
    mine = records[rank * per:(rank + 1) * per]
    padded = mine + records[:1] * (per - len(mine))                     # the padding rows are dropped below
    gens = generate_responses(model, tok, padded, dataset.image_root, cfg)[:len(mine) * cfg.n]
    preds = score_predictions(mine, gens, cfg, tok.count_tokens, reward_cfg, metrics)
    if world_size > 1:
        import torch.distributed as tdist
        every = [None] * world_size
        tdist.all_gather_object(every, preds)
        preds = [p for part in every for p in part]
    return preds


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate(preds, n):
    """Per-sample predictions (prompt-major, n per prompt) -> the metrics of metrics.json."""
    N = len(preds)
    m = dict(n_questions=N // n, n_samples=N,
             first_acc=sum(p.first_correct for p in preds) / N,
             final_acc=sum(p.final_correct for p in preds) / N,
             format=sum(p.format_ok for p in preds) / N,
             mean_len=sum(p.length for p in preds) / N,
             mean_reward=sum(p.reward for p in preds) / N,
             truncated=sum(p.finish == "length" for p in preds) / N)
    for name in preds[0].metrics if preds else []:  # --metric: mean where it applies (not None)
        vals = [p.metrics[name] for p in preds if p.metrics[name] is not None]
        if vals:
            m[name] = sum(vals) / len(vals)
    for c in CASES:
        m[c] = sum(p.case == c for p in preds)
    if n > 1:
        correct = [sum(p.final_correct for p in preds[i:i + n]) for i in range(0, N, n)]
        for k in sorted({1, n}):
            m[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
    return m


BUILTIN_KEYS = ["n_questions", "n_samples", "first_acc", "final_acc", "format", "mean_len", "mean_reward",
                "truncated", *CASES, "skipped_bad_answer", "skipped_bad_record", "seconds"]


def format_table(rows):
    """rows: list of dict(checkpoint, dataset, metrics) -> aligned text table; extra columns:
    pass@k, then the --metric names."""
    keys = {k for r in rows for k in r["metrics"]}
    extra = sorted((k for k in keys if k.startswith("pass@")), key=lambda k: int(k[5:]))
    extra += sorted(k for k in keys if k not in BUILTIN_KEYS and not k.startswith("pass@"))
    head = ["checkpoint", "dataset", "n", "first", "final", *CASES, "format", "len", *extra]
    lines = [head]
    for r in rows:
        m = r["metrics"]
        lines.append([r["checkpoint"], r["dataset"], str(m["n_questions"]), f"{m['first_acc']:.3f}",
                      f"{m['final_acc']:.3f}", *(str(m[c]) for c in CASES), f"{m['format']:.3f}",
                      f"{m['mean_len']:.1f}", *(f"{m.get(k, float('nan')):.3f}" for k in extra)])
    w = [max(len(l[j]) for l in lines) for j in range(len(head))]
    fmt = lambda l: "  ".join(s.ljust(w[j]) if j < 2 else s.rjust(w[j]) for j, s in enumerate(l))
    return "\n".join([fmt(lines[0]), "  ".join("-" * x for x in w)] + [fmt(l) for l in lines[1:]])


# ----------------------------------------------------------------------------- checkpoints

def check_checkpoint(path):
    """Fail before any work (SystemExit naming the checkpoint) if it cannot be loaded: config.json,
    tokenizer.json and the safetensors headers are read; the weights are not."""
    import model as qwen
    from safetensors import safe_open
    try:
        qwen.read_config(path)
        data.Tokenizer.from_dir(path)
        for file in hf_checkpoint.checkpoint_files(path):
            with safe_open(file, framework="pt") as f:
                f.keys()
    except Exception as e:  # any reason at all: name the checkpoint and stop
        raise SystemExit(f"eval.py: --model {path}: not a loadable checkpoint: {type(e).__name__}: {e}") from None


def reward_config(preset):
    """reward.RewardConfig for --reward_preset ("" = reward.py's default)."""
    import reward
    if not preset:
        return reward.RewardConfig()
    return reward.RewardConfig(preset=preset)


def evaluate(ckpts, datasets, cfg, out_dir, device="cpu", metrics=(), reward_cfg=None):
    """Every checkpoint on every Dataset; writes out_dir/predictions/<checkpoint>__<dataset>.jsonl, then
    out_dir/metrics.json once everything is done; returns the table rows."""
    import torch
    import model as qwen
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    names = [os.path.basename(os.path.normpath(c)) for c in ckpts]
    names = names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]
    metrics_path = os.path.join(out_dir, "metrics.json")
    if os.path.exists(metrics_path):  # a stale result must not survive a run that fails below
        os.remove(metrics_path)
    os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
    sys_prompt = data.SYSTEM_PROMPT_REFLECT if cfg.prompt == "reflect" else data.SYSTEM_PROMPT_SINGLE
    drop_bad_records(datasets, checkpoint_tokenizers(ckpts, cfg.max_pixels), sys_prompt)
    for d in datasets:
        d.records, bad = check_answers(d.name, d.records)
        d.skipped = len(bad)
        if cfg.shuffle_images:
            d.records = with_next_images(d.records)
    rows = []
    for ckpt, cname in zip(ckpts, names):
        try:
            tok = data.Tokenizer.from_dir(ckpt)
            tok.image_cfg = hf_checkpoint.image_config(ckpt, cfg.max_pixels)
            m = qwen.from_pretrained(ckpt, device=device, dtype=dtype).eval()
        except Exception as e:
            raise SystemExit(f"eval.py: --model {ckpt}: cannot load: {type(e).__name__}: {e}") from None
        for d in datasets:
            if not d.records:
                print(f"[eval] {d.name}: no records to evaluate", file=sys.stderr)
                continue
            t0 = time.time()
            preds = evaluate_model(m, tok, d, cfg, reward_cfg, metrics)
            result = dict(aggregate(preds, cfg.n), skipped_bad_answer=d.skipped, skipped_bad_record=len(d.bad),
                          seconds=round(time.time() - t0, 1))
            safe = f"{cname}__{d.name}".replace("/", "_").replace(":", "_")
            tmp = os.path.join(out_dir, "predictions", safe + ".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for p in preds:
                    f.write(json.dumps(data.finite_json(asdict(p)), ensure_ascii=False, allow_nan=False) + "\n")
            os.replace(tmp, tmp[:-len(".tmp")])
            rows.append(dict(checkpoint=cname, path=os.path.abspath(ckpt), dataset=d.name, metrics=result,
                             bad_records=[f"{w}: {why}" for w, why in d.bad]))
            print(f"[eval] {cname} on {d.name}: final_acc {result['final_acc']:.3f} ({result['seconds']} s)", file=sys.stderr)
        del m
    data.write_json_atomic(metrics_path, dict(config=asdict(cfg), results=rows))
    return rows


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> EvalConfig:
    return parse_config(EvalConfig, argv, description=__doc__.split("\n")[0],
                        choices={"prompt": ["single", "reflect"], "reward_preset": ["paper", "code"]},
                        minimum={"max_new_tokens": 1, "batch_size": 1, "n": 1, "temperature": 0.0, "limit": 0})


def main(argv=None):
    cfg = parse_args(argv)
    if not cfg.model or not (cfg.data or cfg.bench) or not cfg.out:
        raise SystemExit("eval.py: give --model CKPT [...], --data FILE [...] and/or --bench NAME=PATH [...], "
                         "and --out DIR")
    try:   # outputs never touch inputs: --out is, holds or lies inside no --model
        cli.check_paths("eval.py", {"--out": cfg.out}, [("--model", m) for m in cfg.model])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if cfg.n > 1 and cfg.temperature <= 0:
        raise SystemExit("eval.py: --n > 1 needs --temperature > 0 (greedy samples are identical)")
    if not 0 < cfg.top_p <= 1:
        raise SystemExit(f"eval.py: --top_p must be in (0, 1], got {cfg.top_p}")
    device = cfg.device or ("cuda" if _cuda() else "cpu")
    if device.startswith("cuda") and not _cuda():
        raise SystemExit(f"eval.py: --device {device}: no GPU is visible to torch (torch.cuda.is_available() "
                         f"is False); use --device cpu")
    metrics = [Metric(spec.partition(":")[2], load_function(spec, "--metric")) for spec in cfg.metric]
    clash = [m.name for m in metrics if m.name in BUILTIN_KEYS or m.name.startswith("pass@")]
    if clash or len({m.name for m in metrics}) != len(metrics):
        raise SystemExit(f"eval.py: --metric names must be unique and not built-in metric names, got "
                         f"{[m.name for m in metrics]}")
    rcfg = reward_config(cfg.reward_preset)
    for c in cfg.model:  # fail before any work, not after the first checkpoint's
        check_checkpoint(c)
    try:
        datasets = load_datasets(cfg.data, cfg.bench, os.path.join(cfg.out, "bench_images"), cfg.limit)
    except (ValueError, FileNotFoundError) as e:  # a data error: one line naming file:line and field
        raise SystemExit(f"eval.py: {e}") from None
    try:
        rows = evaluate(cfg.model, datasets, cfg, cfg.out, device, metrics, rcfg)
    except data.BadRecords as e:  # a data set with no usable record: nothing to score
        raise SystemExit(f"eval.py: {e}") from None
    print(format_table(rows))
    if cfg.report:  # the page of every item, the models side by side; curves of the checkpoints' training logs
        from support import report
        report.write_eval_report(cfg.report, [cfg.out],
                                 curves_png=report.curves_of([os.path.join(c, "log.jsonl") for c in cfg.model]))


def _cuda():
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    cli.main("eval.py", main)
