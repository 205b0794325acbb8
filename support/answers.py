"""Answer matching: does a model's answer name the same value as the ground truth?

    answers_match(pred, gt, options=None)        -> bool, one answer
    match_batch(preds, gts, options=None)        -> [[bool]], a whole rollout batch at once
    check_ground_truth(gt, options=None, where="")  raises BadGroundTruth if gt cannot be read

Both sides are first unwrapped: the last \\boxed{}, $...$, "The answer is", "Answer:", trailing dots.
Then, by the kind of the ground truth:
  * multiple choice: a ground truth that is one capital letter ("B", "(B)", "B.") or, when the
    options are given, the text of one option. The prediction's letter ("B", "(B)", "B.", "B)",
    "(B) 12 cm", "\\boxed{B}", "The answer is B") must equal it; a prediction without a letter is
    compared with the options' texts.
  * numbers (integers, decimals with thousands commas, a/b and \\frac{a}{b}, percentages, common
    units stripped): exact rational comparison with relative tolerance rel_tol; x% also matches x/100.
  * words ("red", "yes"): case-, punctuation- and article-insensitive string equality.
  * everything else: math-verify parse + verify, run in a helper process with a hard deadline
    (math-verify's own signal timeout only works in the main thread, and sympy can hang).
A ground truth none of these can read raises BadGroundTruth: it is an error in the data, never a
free reward and never a silent 0. An unreadable prediction is simply wrong.
"""
import atexit
import math
import multiprocessing as mp
import os
import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import connection as mp_connection
from typing import Optional


@dataclass
class MatchConfig:
    """Answer-matching settings (reward.RewardConfig inherits them)."""
    rel_tol: float = 1e-6           # numeric answers: |p - g| <= rel_tol * max(1, |g|)
    max_answer_chars: int = 1000    # longer answer blocks are wrong without being parsed
    timeout_s: float = 2.0          # hard bound on math-verify work per response
    verify_workers: int = min(8, os.cpu_count() or 1)   # math-verify helper processes


class BadGroundTruth(ValueError):
    """The ground truth answer cannot be read: a data error, never a free reward."""


def answers_match(pred: str, gt, options=None, cfg: MatchConfig = MatchConfig()) -> bool:
    """True if pred names the same answer as gt. Raises BadGroundTruth if gt cannot be read."""
    return match_batch([[pred]], [gt], [options], cfg)[0][0]


def check_ground_truth(gt, options=None, where: str = "", cfg: MatchConfig = MatchConfig()) -> None:
    """Raise BadGroundTruth, its message starting with `where`, if gt cannot be read.

    Call it on every record when a data file is loaded (on every rank), so that a bad record
    stops the run at once, naming itself, instead of raising mid-rollout on one rank while the
    others wait. Cheap: a letter, number or word is decided in Python; only a LaTeX / symbolic
    ground truth goes to math-verify (once per distinct value)."""
    try:
        _Matcher(gt, options, cfg)
    except BadGroundTruth as e:
        raise BadGroundTruth(f"{where}: {e}" if where else str(e)) from None


def match_batch(preds: list, gts: list, options: Optional[list] = None,
                cfg: MatchConfig = MatchConfig(), where: str = "") -> list:
    """preds[i]: the answers to judge against gts[i] (options[i] for multiple choice).
    -> out[i][k] = whether preds[i][k] names gts[i].

    Everything Python can decide is decided here; the rest (LaTeX) becomes one math-verify job
    per item, and all jobs of the batch run at once on cfg.verify_workers helper processes,
    each bounded by cfg.timeout_s (a job past it leaves its answers wrong). Raises
    BadGroundTruth for the first unreadable ground truth, its message prefixed by
    where.format(i=index)."""
    options = [None] * len(gts) if options is None else options
    matchers, items, jobs = {}, [], []   # one matcher per distinct (gt, options): a group shares it
    for i, (ps, g, opts) in enumerate(zip(preds, gts, options)):
        key = (type(g), repr(g), repr(opts))
        try:
            if key not in matchers:
                matchers[key] = _Matcher(g, opts, cfg)
        except BadGroundTruth as e:
            raise BadGroundTruth(f"{where.format(i=i)}{e}") from None
        out, pending = matchers[key].fast(ps)
        items.append((matchers[key], out, pending, len(jobs) if pending else None))
        if pending:
            jobs.append(matchers[key].job(pending))
    results = _MV(jobs, cfg.verify_workers, cfg.timeout_s) if jobs else []
    for i, (matcher, out, pending, j) in enumerate(items):
        if j is not None:
            try:
                matcher.finish(out, pending, results[j])
            except BadGroundTruth as e:
                raise BadGroundTruth(f"{where.format(i=i)}{e}") from None
    return [out for _, out, _, _ in items]


# ----------------------------------------------------------------------------- matching one ground truth

def _options_dict(options):
    """options: list of texts (A, B, C, ...) or dict letter -> text. Returns {letter: text}."""
    if options is None:
        return {}
    if isinstance(options, dict):
        items = [(str(k).strip().strip("()."), str(v)) for k, v in options.items()]
    else:
        items = [(chr(ord("A") + i), str(v)) for i, v in enumerate(options)]
    return {k.upper(): re.sub(r"^\(?[A-Z][.):]\s+", "", v.strip()) for k, v in items}


class _Matcher:
    """Answer matcher for one ground truth; decides the ground truth's kind once."""

    def __init__(self, gt, options, cfg):
        if not isinstance(gt, (str, int, float)) or isinstance(gt, bool):
            raise BadGroundTruth(f"ground truth {gt!r} is not a string or number")
        self.cfg, self.raw = cfg, str(gt)
        self.opts = _options_dict(options)
        self.g = clean_answer(self.raw)
        if not self.g or len(self.g) > cfg.max_answer_chars or "\x00" in self.g:
            raise BadGroundTruth(f"ground truth {self.raw[:80]!r} is empty, too long or binary")
        self.letter = letter_of(self.g, len(self.opts) or 26) if self.g[0].isupper() or \
            self.g[0] == "(" else None
        if self.letter is None and self.opts:   # gt is an option's text
            self.letter = next((k for k, v in self.opts.items()
                                if clean_answer(v) == self.g or self._value(v, self.g)), None)
        self.num = number_of(self.g)
        self.is_words = self.num is None and bool(_WORDS_RE.fullmatch(self.g))
        if self.letter is None and self.num is None and not self.is_words \
                and (self.g, cfg.timeout_s) not in _GOOD_GT:
            status = _MV([(self.g, [])], 1, cfg.timeout_s)[0][0]
            if status != "ok":
                raise BadGroundTruth(f"ground truth {self.raw[:80]!r} cannot be parsed "
                                     f"(no choice letter, number, word or math-verify expression"
                                     f"{'; timed out' if status == 'timeout' else ''})")
            if len(_GOOD_GT) > 4096:
                _GOOD_GT.clear()
            _GOOD_GT.add((self.g, cfg.timeout_s))

    def _value(self, p, g):
        """p, g cleaned: True / False for numbers and words, None when math-verify must decide."""
        pn, gn = number_of(p), number_of(g)
        if pn is not None and gn is not None:
            return numbers_equal(pn, gn, self.cfg.rel_tol)
        if gn is None and _WORDS_RE.fullmatch(g):
            return words_of(p) == words_of(g) and bool(words_of(g))
        return None

    def fast(self, preds: list):
        """(out, pending): correctness decided here without math-verify, and the (index, cleaned
        pred) pairs left for math-verify (their out entries stay False until finish)."""
        out, pending = [], []
        for p in preds:
            p = clean_answer(p) if isinstance(p, str) and len(p) <= self.cfg.max_answer_chars else ""
            if not p:
                out.append(False)
            elif self.letter is not None:
                out.append(self._choice(p))
            else:
                v = self._value(p, self.g)
                if v is None and not _WORDS_RE.fullmatch(p) and "\x00" not in p:
                    pending.append((len(out), _unit_free(p)))
                out.append(bool(v))
        return out, pending

    def job(self, pending):
        return (self.g if self.num is None else _unit_free(self.g), [p for _, p in pending])

    def finish(self, out, pending, result):
        status, res = result   # a timed-out job leaves its answers wrong
        if status == "bad":
            raise BadGroundTruth(f"ground truth {self.raw[:80]!r} cannot be parsed by math-verify")
        for (i, _), r in zip(pending, res or [False] * len(pending)):
            out[i] = bool(r)
        return out

    def _choice(self, p):
        letter = letter_of(p, len(self.opts) or 26)
        if letter is None and self.opts:   # the option's text instead of its letter
            letter = next((k for k, v in self.opts.items() if self._value(p, clean_answer(v))), None)
        return letter == self.letter


def _unit_free(s):
    m = _UNIT_RE.fullmatch(s)
    return m.group(1) if m and number_of(m.group(1)) is not None else s


# ----------------------------------------------------------------------------- answer cleaning

def unwrap_boxed(s: str) -> str:
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces); s itself if none."""
    start = max(s.rfind("\\boxed{"), s.rfind("\\fbox{"))
    if start < 0:
        return s
    i = s.index("{", start) + 1
    depth = 1
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i:j]
    return s   # unbalanced: leave it to the later stages


_LEAD_RE = re.compile(r"\b(?:answer|option|choice)\b\s*(?:is\s*:?|:)?\s*", re.I)
_DELIMS = [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")]


def clean_answer(s: str) -> str:
    """Strip the wrapping people and models put around an answer value."""
    s = unwrap_boxed(s.strip().replace("\u2212", "-"))
    last = None
    for last in _LEAD_RE.finditer(s):
        pass
    if last is not None:
        s = s[last.end():]
    s = unwrap_boxed(s.strip())
    for _ in range(2):
        s = s.strip().rstrip(".").strip()
        for a, b in _DELIMS:
            if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s = s[len(a):-len(b)]
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    return s.strip().rstrip(".").strip()


_LETTER_ONLY = re.compile(r"\(?([A-Za-z])\)?[.):]?")
_LETTER_LEAD = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.):])\s+\S")


def letter_of(s: str, n_options: int = 26) -> Optional[str]:
    """The choice letter a cleaned answer names ("B", "(B)", "B.", "B)", "b", "(B) 12"), or None."""
    m = _LETTER_ONLY.fullmatch(s)
    letter = m.group(1).upper() if m else None
    if letter is None:
        m = _LETTER_LEAD.match(s)
        letter = (m.group(1) or m.group(2)) if m else None
    if letter is not None and ord(letter) - ord("A") < n_options:
        return letter
    return None


_UNITS = (r"cm|mm|km|m|kg|g|mg|s|sec|seconds?|mins?|minutes?|h|hrs?|hours?|days?|weeks?|"
          r"months?|years?|degrees?|deg|units?|inch(?:es)?|in|ft|feet|foot|yards?|miles?|mph|"
          r"km/h|m/s|l|ml|liters?|litres?|dollars?|cents?|pounds?|lbs?|meters?|metres?|"
          r"centimeters?|millimeters?|kilometers?|grams?|kilograms?|points?|people|persons?|"
          r"times|items?|objects?")
_UNIT_RE = re.compile(r"(.*?\d)\s*(?:\\,|\\ |~)?\s*(?:" + _UNITS + r")(?:\^?\{?[23]\}?|²|³)?", re.I)
_NUM_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_FRAC_RE = re.compile(r"([+-]?\d+)\s*/\s*(\d+)|([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")


def number_of(s: str):
    """(Fraction value, is_percent) of a plain number with optional unit / %, else None."""
    s = s.replace("\\%", "%").replace("\\!", "").replace("{,}", ",")
    s = re.sub(r"\^\{?\\circ\}?|°", "", s).strip()
    if s.startswith("\\$") or (s.startswith("$") and "$" not in s[1:]):
        s = s.lstrip("\\$").strip()
    m = _UNIT_RE.fullmatch(s)
    if m:
        s = m.group(1)
    pct = s.endswith("%")
    s = s.rstrip("%").strip()
    if _NUM_RE.fullmatch(s):
        return Fraction(s.replace(",", "")), pct
    m = _FRAC_RE.fullmatch(s)
    if m:
        num, den = (int(m.group(1)), int(m.group(2))) if m.group(1) else \
            (int(m.group(3) + m.group(4)), int(m.group(5)))
        return (Fraction(num, den), pct) if den != 0 else None
    return None


def numbers_equal(p, g, rel_tol: float) -> bool:
    pv = [p[0], p[0] / 100] if p[1] else [p[0]]
    gv = [g[0], g[0] / 100] if g[1] else [g[0]]
    return any(abs(a - b) <= Fraction(rel_tol) * max(1, abs(b)) for a in pv for b in gv)


_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z '\-]*")


def words_of(s: str) -> str:
    s = re.sub(r"[^a-z0-9 ]", " ", s.casefold())
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


# ----------------------------------------------------------------------------- math-verify helper process

def _mv_wrap(s: str) -> str:
    return s if ("$" in s or "\\(" in s or "\\[" in s) else "$" + s + "$"


def _verify_job(gt, preds, timeout_s, gt_cache):
    """math-verify one job with its own signal timeout (main thread only): ("ok", [bool]) | ("bad", None)."""
    import logging
    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)   # it logs whole inputs on timeout
    t = max(1, math.ceil(timeout_s))
    try:
        if gt not in gt_cache:
            parsed = parse(_mv_wrap(gt), parsing_timeout=t)
            if len(gt_cache) > 4096:
                gt_cache.clear()
            gt_cache[gt] = parsed if any(not isinstance(x, str) for x in parsed) else None
        if gt_cache[gt] is None:
            return ("bad", None)
        return ("ok", [bool(verify(gt_cache[gt], parse(_mv_wrap(p), parsing_timeout=t), timeout_seconds=t))
                       for p in preds])
    except Exception:   # math-verify is meant not to raise; if it does, the answers are wrong
        return ("ok", [False] * len(preds))


def _worker_loop(conn, timeout_s, parent_pid):
    """Helper process: runs jobs until the parent closes the pipe or dies; gt parses cached.
    (A forked child also holds copies of the parent's pipe ends, so a parent killed with -9 gives
    no EOF here: the worker checks that its parent is still alive instead of lingering forever.)"""
    gt_cache = {}
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent_pid:
                return
            continue
        try:
            gt, preds = conn.recv()
        except EOFError:
            return
        conn.send(_verify_job(gt, preds, timeout_s, gt_cache))


class _MathVerifier:
    """Up to n long-lived helper processes running math-verify. Each job (gt, preds) has its own
    deadline; a worker that passes it is killed (a fresh one is forked when next needed).
    Safe to call from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.workers = {}   # index -> (process, connection, timeout_s)
        self.gt_cache = {}  # only for the in-process fallback
        atexit.register(self.close)

    def close(self):
        for w in list(self.workers):
            self._kill(w)

    def _start(self, w, timeout_s):
        import math_verify  # noqa: F401  imported before the fork, so a restart costs milliseconds
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_loop, args=(child, timeout_s, os.getpid()), daemon=True)
        proc.start()
        child.close()
        self.workers[w] = (proc, conn, timeout_s)

    def _kill(self, w):
        proc, conn, _ = self.workers.pop(w)
        proc.kill()
        proc.join()
        conn.close()

    def __call__(self, jobs: list, n_workers: int, timeout_s: float) -> list:
        """jobs: [(gt, [pred, ...])] -> per job ("ok", [bool per pred]) | ("bad", None) | ("timeout", None)."""
        if mp.current_process().daemon:   # may not have children (DataLoader / Pool worker):
            # in-process, bounded by math-verify's signal timeout, which needs the main thread
            return [_verify_job(g, preds, timeout_s, self.gt_cache) for g, preds in jobs]
        results = [("timeout", None)] * len(jobs)
        todo, busy = list(range(len(jobs)))[::-1], {}   # busy: worker -> (job, deadline)
        with self.lock:
            try:
                self._run(jobs, n_workers, timeout_s, todo, busy, results)
            finally:   # interrupted (Ctrl-C, broken pipe): never leave a stale answer in a pipe
                for w in busy:
                    if w in self.workers:
                        self._kill(w)
        return results

    def _run(self, jobs, n_workers, timeout_s, todo, busy, results):
        """Keep up to n_workers jobs in flight; collect answers; kill workers past their deadline."""
        while todo or busy:
            for w in range(max(1, n_workers)):
                if w in busy or not todo:
                    continue
                if w in self.workers and (not self.workers[w][0].is_alive()
                                          or self.workers[w][2] != timeout_s):
                    self._kill(w)
                if w not in self.workers:
                    self._start(w, timeout_s)
                j = todo.pop()
                self.workers[w][1].send(jobs[j])
                busy[w] = (j, time.monotonic() + timeout_s)
            wait_s = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            ready = mp_connection.wait([self.workers[w][1] for w in busy], timeout=wait_s)
            for w, (j, deadline) in list(busy.items()):
                if self.workers[w][1] in ready:
                    try:
                        results[j] = self.workers[w][1].recv()
                    except EOFError:   # the worker died: the job stays "timeout"
                        self._kill(w)
                    del busy[w]
                elif time.monotonic() >= deadline:
                    self._kill(w)
                    del busy[w]


_MV = _MathVerifier()
_GOOD_GT = set()   # (cleaned gt, timeout) that math-verify parsed: skip re-checking them
