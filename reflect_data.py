"""
Stage 1 data: reflection SFT samples from the policy's own attempts (SRPO.md, "Reflection SFT").

For each training question:

1. the policy answers it (sampler.generate, batched, system prompt SYSTEM_PROMPT_SINGLE), once
   or --attempts k times;
2. reward.py judges each attempt against record["answer"]: it must be in the single-pass format
   <think>..</think><answer>..</answer> (an item with no such attempt is rejected: there is
   nothing to reflect on), and it is either correct or wrong. With k > 1 the attempt used is one
   of the kind the mix needs (below);
3. a teacher that sees the question, the image, the attempt, its answer and the ground truth
   writes a reflection and a second attempt:
       rule    the built-in task's rule-based teacher (task.teacher_reflection, which knows the
               true scene and checks the question item by item over the scene list; the counts
               that check found, task.count_text, are the second attempt)
       openai  any OpenAI-compatible /chat/completions endpoint, images inline as base64 data
               URLs, threads for concurrency, per-request timeout, retries with exponential
               backoff; the key comes from an environment variable and is never logged or written
       local   a checkpoint of ours through our sampler (same prompt as openai)
   openai / local teachers answer in tags: <reflection>..</reflection><think>..</think><answer>..</answer>;
4. the SFT sample is the two-pass response
       <think>attempt think</think>\\n<answer>attempt answer</answer>\\n<reflection>..</reflection>\\n
       <think>second think</think>\\n<answer>final answer</answer>
   under SYSTEM_PROMPT_REFLECT. It is kept only if the reflection is non-empty and does not
   copy the attempt, and reward.srpo_reward finds the exact two-pass format and a correct final
   answer (so the case is w2r for a wrong attempt, r2r for a correct one);
5. the mix: a fraction correct_frac (paper: ~0.3) of the samples come from correct attempts
   (the reflection confirms / refines), the rest from wrong ones (it corrects). Lines cannot be
   un-written, so the mix is enforced while streaming: a sample of kind c is written only if
   afterwards count(c) <= ceil(share(c) * total). Every prefix of the output file keeps the mix,
   and at the end the fraction is within 1/total of correct_frac. Items over quota are checked
   before the teacher is asked (no wasted calls) and again at write time.

Resumable: samples are appended one line at a time (data.append_jsonl: one write, fsync), ids of
rejected items go to a sidecar OUT_STEM.rejected.jsonl (OUT without .jsonl) with the reason; a
rerun skips both and repairs a torn last line left by a kill. Teacher failures (timeouts, HTTP
errors, malformed replies after all retries) are written nowhere, so the next run tries them
again. At the end a summary (per-case counts, rejections by reason, teacher failures) is printed
and written as JSON (--summary, default <dir of OUT>/summary.json).

    python reflect_data.py --policy runs/base --data runs/task/train.jsonl --out runs/reflect/train.jsonl --teacher rule
    TEACHER_KEY=... python reflect_data.py --policy CKPT --data train.jsonl --out reflect.jsonl \\
        --teacher openai --teacher-url http://HOST/v1 --teacher-model MODEL --teacher-key-env TEACHER_KEY
    python reflect_data.py --policy CKPT --data train.jsonl --out reflect.jsonl --teacher local --teacher-model BIG_CKPT
"""
import base64
import concurrent.futures
import http.client
import json
import math
import mimetypes
import os
import random
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

import data
import answers
import reward
from config import parse_config

# The instructions the openai / local teacher gets (system message). The user message is
# teacher_user_text(item) plus the image(s).
TEACHER_PROMPT = """\
You are an expert teacher reviewing a student's solution to a visual reasoning problem.
You are given the image, the question, the student's reasoning, the student's answer, the
correct answer, and whether the student's answer is correct.

Write two things:
1. A reflection on the student's attempt, written in the first person as if the student were
   checking their own work: go through the reasoning against the image and the question, say
   precisely which step or fact was wrong and what is true instead, or, if the attempt is
   correct, confirm the key steps and point out anything that could be tighter. Be concise and
   specific. Do not copy the student's reasoning, and do not state the correct answer as a
   given fact ("the correct answer is ...") without the reasoning that leads to it.
2. A second, improved solution that follows from the reflection: clear step-by-step reasoning
   that ends in the correct answer.

Reply in exactly this format and nothing else:
<reflection>your reflection</reflection>
<think>the improved step-by-step reasoning</think>
<answer>the final answer only (a number, a letter or an expression)</answer>
"""


def teacher_user_text(item):
    verdict = "correct" if item.attempt_correct else "incorrect"
    return (f"Question: {item.question}\n\n"
            f"Student's reasoning:\n{item.attempt_think}\n\n"
            f"Student's answer: {item.attempt_answer}\n\n"
            f"Correct answer: {item.gt}\n"
            f"The student's answer is {verdict}.")


@dataclass
class ReflectConfig:
    policy: str = ""              # checkpoint dir of the policy (config.json, model.safetensors, tokenizer.json)
    data: str = ""                # training JSONL (records with messages + answer; images relative to it)
    out: str = ""                 # SFT JSONL written here (appended)
    summary: str = ""             # summary JSON; default: <dir of out>/summary.json
    teacher: str = "rule"         # rule | openai | local
    teacher_url: str = ""         # openai: base URL (.../v1) or the full .../chat/completions URL
    teacher_model: str = ""       # openai: model name; local: checkpoint dir
    teacher_key_env: str = "OPENAI_API_KEY"  # openai: NAME of the environment variable holding the key
    teacher_temperature: float = 0.7  # openai / local teacher sampling
    teacher_max_tokens: int = 1024    # openai / local teacher reply length
    timeout_s: float = 120.0      # openai: per request
    retries: int = 3              # openai: extra tries per item after a failure; local: resampling rounds
    backoff_s: float = 2.0        # openai: wait backoff_s * 2^k (+ jitter) before retry k
    concurrency: int = 8          # openai: requests in flight
    correct_frac: float = 0.3     # share of samples from correct attempts; < 0 = keep everything
    attempts: int = 1             # policy samples per question; the one of the kind the mix needs is used
    limit: int = 0                # use only the first N training records (0 = all)
    batch_size: int = 16          # prompts per sampler call (and items per teacher round)
    max_new_tokens: int = 256     # policy attempt length
    temperature: float = 1.0      # policy sampling
    top_p: float = 1.0            # policy sampling nucleus
    seed: int = 0                 # sampling seed (policy; local teacher uses a derived one)
    device: str = ""              # default: cuda if available, else cpu


@dataclass
class Item:
    """One training question on its way through the pipeline."""
    id: str
    record: dict
    where: str                    # "train.jsonl:12" for error messages
    question: str
    images: list                  # absolute image paths of the prompt
    gt: str
    attempt: str = ""             # the policy's raw response
    attempt_think: str = ""
    attempt_answer: str = ""
    attempt_correct: bool = False


@dataclass
class TeacherReply:
    reflection: str = ""
    think: str = ""
    answer: str = ""
    error: str = ""               # non-empty: the teacher failed (retried next run)


# ----------------------------------------------------------------------------- records

def record_question(rec, where):
    """The question text: record['question'], else the text parts of the last user turn."""
    if isinstance(rec.get("question"), str) and rec["question"].strip():
        return rec["question"]
    user = [m for m in rec.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise ValueError(f"{where}: no field 'question' and no user turn in 'messages'")
    c = user[-1].get("content")
    return c if isinstance(c, str) else " ".join(p["text"] for p in c if isinstance(p, dict) and "text" in p)


def prompt_images(messages, image_root):
    """Absolute paths of the images of a conversation, in order."""
    out = []
    for m in messages:
        for p in m["content"] if isinstance(m.get("content"), list) else []:
            if isinstance(p, dict) and (p.get("type") == "image" or "image" in p):
                out.append(os.path.normpath(os.path.join(image_root, p["image"])))
    return out


def load_items(path, limit):
    """Items of the training file (first `limit` records if > 0); errors name file:line:field."""
    records = data.read_jsonl(path)
    with open(path, encoding="utf-8") as f:  # line numbers of the non-blank lines, as read_jsonl
        lines = [i for i, line in enumerate(f.read().split("\n"), start=1) if line.strip()]
    root = os.path.dirname(os.path.abspath(path))
    items, seen = [], set()
    for rec, line in list(zip(records, lines))[:limit or None]:
        where = f"{path}:{line}"
        for field in ("id", "answer"):
            if not isinstance(rec.get(field), (str, int, float)) or str(rec[field]).strip() == "":
                raise ValueError(f"{where}: field '{field}' missing or empty")
        rid = str(rec["id"])
        if rid in seen:
            raise ValueError(f"{where}: field 'id': duplicate id {rid!r}")
        seen.add(rid)
        msgs = data.prompt_messages(rec, data.SYSTEM_PROMPT_SINGLE)
        items.append(Item(id=rid, record=rec, where=where, question=record_question(rec, where),
                          images=prompt_images(msgs, root), gt=str(rec["answer"])))
    return items


# ----------------------------------------------------------------------------- resume state

def repair_torn_tail(path):
    """A kill during append can leave an unterminated last line: cut it off (that item is redone)."""
    if not os.path.exists(path):
        return False
    with open(path, "rb+") as f:
        raw = f.read()
        if not raw or raw.endswith(b"\n"):
            return False
        f.truncate(raw.rfind(b"\n") + 1)
    return True


def load_done(out, rejected_path):
    """(written records, rejected records) of earlier runs, after repairing torn tails."""
    for p in (out, rejected_path):
        if repair_torn_tail(p):
            print(f"reflect_data.py: {p}: removed an incomplete last line (interrupted write)", file=sys.stderr)
    written = data.read_jsonl(out) if os.path.exists(out) else []
    rejected = data.read_jsonl(rejected_path) if os.path.exists(rejected_path) else []
    return written, rejected


# ----------------------------------------------------------------------------- the mix

def within_quota(counts, kind, frac):
    """May one more sample of kind ('correct' | 'wrong') be written, given counts so far?
    Yes iff afterwards count(kind) <= ceil(share * total). frac < 0: no mix enforced."""
    if frac < 0:
        return True
    share = frac if kind == "correct" else 1.0 - frac
    total = counts["correct"] + counts["wrong"] + 1
    return counts[kind] + 1 <= math.ceil(share * total - 1e-9)


# ----------------------------------------------------------------------------- policy attempts

def load_checkpoint(path, device):
    import torch
    import model as model_lib
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return model_lib.from_pretrained(path, device=device, dtype=dtype).eval(), data.Tokenizer.from_dir(path)


def sample_texts(net, tok, conversations, wheres, scfg):
    """scfg.n sampled responses per conversation (messages with absolute image paths) -> list[str],
    conversation-major."""
    import sampler
    enc = [data.encode_messages(m, tok, "/", add_generation_prompt=True, where=w)
           for m, w in zip(conversations, wheres)]
    batch = data.collate(enc, tok.pad_id, left_pad=True)
    out = sampler.generate(net, batch, tok.eos_ids, scfg, pad_id=tok.pad_id)
    return [tok.decode(out["tokens"][i, :int(out["lengths"][i])].tolist(), skip_special_tokens=True)
            for i in range(len(out["tokens"]))]


def with_abs_images(messages, image_paths):
    """The conversation with its image references replaced by the given absolute paths, in order."""
    paths = iter(image_paths)
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [{**p, "image": next(paths)} if isinstance(p, dict) and (p.get("type") == "image" or "image" in p)
                 else p for p in c]
        out.append({**m, "content": c})
    return out


class SamplerPolicy:
    """First attempts of a checkpoint through our KV-cached sampler."""

    def __init__(self, cfg: ReflectConfig):
        import sampler
        self.net, self.tok = load_checkpoint(cfg.policy, cfg.device)
        self.scfg = sampler.SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, seed=cfg.seed, n=cfg.attempts)

    def attempts(self, items):
        """-> per item, a list of cfg.attempts responses."""
        self.scfg.seed += 1  # a fresh draw per batch, reproducible from cfg.seed
        convs = [with_abs_images(data.prompt_messages(it.record, data.SYSTEM_PROMPT_SINGLE), it.images) for it in items]
        texts = sample_texts(self.net, self.tok, convs, [it.where for it in items], self.scfg)
        k = self.scfg.n
        return [texts[i * k:(i + 1) * k] for i in range(len(items))]


def judge_attempts(items, attempts):
    """attempts: per item a response or a list of them. -> per item a list of usable candidates
    (text, think, answer, correct) -- single-pass format, judged by reward.py -- and
    {item id: rejection reason} for items without one."""
    bad, cands, flat = {}, [[] for _ in items], []
    for i, (it, texts) in enumerate(zip(items, attempts)):
        texts = [texts] if isinstance(texts, str) else list(texts)
        it.attempt = texts[0] if texts else ""
        try:
            answers.check_ground_truth(it.gt)
        except answers.BadGroundTruth as e:
            bad[it.id] = f"bad_ground_truth: {e}"
            continue
        for text in texts:
            p = reward.parse_response(text)
            if p.is_single_pass_format:
                flat.append((i, text, p.thinks[0].strip(), p.answers[0].strip()))
        if not any(f[0] == i for f in flat):
            bad[it.id] = "attempt_format"
    scores = reward.score_batch([f[1] for f in flat], [items[f[0]].gt for f in flat], mode="grpo")
    for (i, text, think, answer), sc in zip(flat, scores):
        cands[i].append((text, think, answer, bool(sc.final_correct)))
    return cands, bad


def choose_attempts(items, cands, why, counts, frac):
    """Pick each item's attempt and decide who goes to the teacher: the candidate of the kind the
    mix needs most (correct while its share is below frac, else wrong), if that kind is within
    quota, counting the items already chosen from this chunk. Over-quota items get a reason."""
    pending, ask = Counter(), []
    for it, cs in zip(items, cands):
        if it.id in why:
            continue
        c = counts + pending
        need_correct = frac >= 0 and c["correct"] < frac * (c["correct"] + c["wrong"] + 1)
        text, think, answer, ok = next((x for x in cs if x[3] == need_correct), cs[0])
        it.attempt, it.attempt_think, it.attempt_answer, it.attempt_correct = text, think, answer, ok
        kind = "correct" if ok else "wrong"
        if within_quota(c, kind, frac):
            pending[kind] += 1
            ask.append(it)
        else:
            why[it.id] = f"over_quota_{kind}"
    return ask


# ----------------------------------------------------------------------------- teachers

def parse_teacher(text):
    """TeacherReply from '<reflection>..</reflection><think>..</think><answer>..</answer>': the
    first reflection, then the first think after it, then the first answer after that (so a
    reasoning model's own leading <think> block is skipped)."""
    text, got, pos = text or "", {}, 0
    for tag in ("reflection", "think", "answer"):
        m = re.compile(rf"<{tag}>(.*?)</{tag}>", re.S).search(text, pos)
        if m is None or not m.group(1).strip():
            return TeacherReply(error=f"unparsable reply (no non-empty <{tag}> block in order "
                                      f"<reflection>, <think>, <answer>)")
        got[tag], pos = m.group(1).strip(), m.end()
    return TeacherReply(got["reflection"], got["think"], got["answer"])


class RuleTeacher:
    """Built-in task: task.teacher_reflection (knows the true scene; checks item by item) + the counts
    that check found (task.count_text) as the second attempt."""
    name = "rule"

    def reflect(self, items):
        import task
        out = []
        for it in items:
            if "scene" not in it.record or "params" not in it.record:
                raise ValueError(f"{it.where}: the rule teacher needs the built-in task's fields 'scene' and "
                                 f"'params' (use --teacher openai or local for other data)")
            out.append(TeacherReply(task.teacher_reflection(it.record, it.attempt_think, it.attempt_answer),
                                    task.count_text(it.record), it.record["answer"]))
        return out


class RetryableError(Exception):
    pass


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint, over urllib, `concurrency` requests in flight."""

    def __init__(self, cfg: ReflectConfig):
        if not cfg.teacher_url or not cfg.teacher_model:
            raise SystemExit("reflect_data.py: --teacher openai needs --teacher-url and --teacher-model")
        self.key = os.environ.get(cfg.teacher_key_env, "")
        if not self.key:
            raise SystemExit(f"reflect_data.py: --teacher openai: environment variable {cfg.teacher_key_env} "
                             f"(--teacher-key-env) is not set")
        url = cfg.teacher_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.cfg = cfg
        self.name = f"openai:{cfg.teacher_model}"

    def redact(self, s):
        return s.replace(self.key, "***") if self.key else s

    def request_body(self, it):
        content = [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in it.images]
        content.append({"type": "text", "text": teacher_user_text(it)})
        return {"model": self.cfg.teacher_model, "temperature": self.cfg.teacher_temperature,
                "max_tokens": self.cfg.teacher_max_tokens,
                "messages": [{"role": "system", "content": TEACHER_PROMPT}, {"role": "user", "content": content}]}

    def post(self, body):
        """One request -> the reply text. Raises RetryableError or RuntimeError (do not retry)."""
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            msg = f"HTTP {e.code}"  # the body is not read: it is not ours to log (it may echo the request)
            e.close()
            if e.code in (408, 409, 425, 429) or e.code >= 500:
                raise RetryableError(msg) from None
            raise RuntimeError(msg) from None  # 400/401/403/404...: retrying will not help
        except (TimeoutError, socket.timeout):
            raise RetryableError("timeout") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise RetryableError("timeout") from None
            raise RetryableError(f"connection error: {type(e.reason).__name__}") from None
        except (OSError, http.client.HTTPException) as e:  # reset, remote closed, incomplete read
            raise RetryableError(f"connection error: {type(e).__name__}") from None
        try:
            c = json.loads(raw)["choices"][0]["message"]["content"]
        except json.JSONDecodeError:
            raise RetryableError("malformed JSON") from None
        except (KeyError, IndexError, TypeError):
            raise RetryableError("no choices[0].message.content in reply") from None
        if isinstance(c, list):  # content as a list of parts
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
        if not isinstance(c, str):
            raise RetryableError("no choices[0].message.content in reply")
        return c

    def reflect_one(self, it):
        body = self.request_body(it)
        rng = random.Random(it.id)
        error = ""
        for k in range(self.cfg.retries + 1):
            if k:
                time.sleep(self.cfg.backoff_s * 2 ** (k - 1) * (1 + 0.25 * rng.random()))
            try:
                reply = parse_teacher(self.post(body))
                if not reply.error:
                    return reply
                error = reply.error
            except RetryableError as e:
                error = str(e)
            except RuntimeError as e:
                return TeacherReply(error=self.redact(str(e)))
        return TeacherReply(error=self.redact(f"{error} (after {self.cfg.retries + 1} tries)"))

    def reflect(self, items):
        with concurrent.futures.ThreadPoolExecutor(max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(self.reflect_one, items))


def image_data_url(path):
    """data:<mime>;base64,... of an image file (re-encoded as PNG if its type is unknown)."""
    mime = mimetypes.guess_type(path)[0]
    if mime in ("image/png", "image/jpeg", "image/webp", "image/gif"):
        with open(path, "rb") as f:
            raw = f.read()
    else:
        import io
        buf = io.BytesIO()
        data.load_image(path).save(buf, format="PNG")
        raw, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


class LocalTeacher:
    """A checkpoint of ours as the teacher: TEACHER_PROMPT + image + teacher_user_text, sampled;
    items with an unparsable reply are resampled (new seed) up to `retries` times."""

    def __init__(self, cfg: ReflectConfig):
        import sampler
        if not cfg.teacher_model:
            raise SystemExit("reflect_data.py: --teacher local needs --teacher-model CHECKPOINT_DIR")
        self.net, self.tok = load_checkpoint(cfg.teacher_model, cfg.device)
        self.scfg = sampler.SampleConfig(max_new_tokens=cfg.teacher_max_tokens, temperature=cfg.teacher_temperature,
                                         seed=cfg.seed + 1_000_003)
        self.retries = cfg.retries
        self.name = f"local:{cfg.teacher_model}"

    def reflect(self, items):
        replies = [TeacherReply(error="not asked") for _ in items]
        for _ in range(self.retries + 1):
            todo = [i for i, r in enumerate(replies) if r.error]
            if not todo:
                break
            convs = [[{"role": "system", "content": TEACHER_PROMPT},
                      {"role": "user", "content": [{"type": "image", "image": p} for p in items[i].images]
                       + [{"type": "text", "text": teacher_user_text(items[i])}]}] for i in todo]
            self.scfg.seed += 1
            for i, text in zip(todo, sample_texts(self.net, self.tok, convs, [items[i].where for i in todo], self.scfg)):
                replies[i] = parse_teacher(text)
        return replies


def make_teacher(cfg):
    if cfg.teacher == "rule":
        return RuleTeacher()
    if cfg.teacher == "openai":
        return OpenAITeacher(cfg)
    if cfg.teacher == "local":
        return LocalTeacher(cfg)
    raise SystemExit(f"reflect_data.py: --teacher must be rule, openai or local, got {cfg.teacher!r}")


# ----------------------------------------------------------------------------- samples

def norm(s):
    return " ".join(s.lower().split())


def copies_attempt(reflection, think):
    """The reflection repeats the attempt instead of critiquing it: equal to its reasoning, or one
    contains the other (each at least 20 characters) after case / whitespace normalisation."""
    r, t = norm(reflection), norm(think)
    return r == t or (len(t) >= 20 and t in r) or (len(r) >= 20 and r in t)


def two_pass_text(it, reply):
    return (f"<think>{it.attempt_think}</think>\n<answer>{it.attempt_answer}</answer>\n"
            f"<reflection>{reply.reflection.strip()}</reflection>\n"
            f"<think>{reply.think.strip()}</think>\n<answer>{reply.answer.strip()}</answer>")


def check_samples(items, replies):
    """(response text, rejection reason or '') per item with a teacher reply (reply.error == '')."""
    texts = [two_pass_text(it, r) for it, r in zip(items, replies)]
    scores = reward.score_batch(texts, [it.gt for it in items], mode="srpo")  # format + final answer
    out = []
    for it, r, text, s in zip(items, replies, texts, scores):
        if not r.reflection.strip():
            why = "empty_reflection"
        elif copies_attempt(r.reflection, it.attempt_think):
            why = "reflection_copies_attempt"
        elif not reward.parse_response(text).is_two_pass_format:
            why = "bad_format"   # e.g. the teacher put tags inside its text
        elif not s.final_correct:
            why = "second_answer_wrong"
        else:
            why = ""
        out.append((text, why))
    return out


def sample_record(it, text, out_dir, teacher_name):
    """The SFT record: the training record's fields, two-pass messages, images relative to out_dir."""
    rel = [os.path.relpath(p, out_dir) for p in it.images]
    turns = with_abs_images([m for m in data.prompt_messages(it.record, None) if m.get("role") != "system"], rel)
    rec = {k: v for k, v in it.record.items() if k != "messages"}
    if isinstance(rec.get("image"), str) and len(rel) == 1:
        rec["image"] = rel[0]
    source = "correct" if it.attempt_correct else "wrong"
    rec.update(messages=[{"role": "system", "content": data.SYSTEM_PROMPT_REFLECT}, *turns,
                         {"role": "assistant", "content": text}],
               source=source, case="r2r" if it.attempt_correct else "w2r", teacher=teacher_name,
               attempt=it.attempt)
    return rec


# ----------------------------------------------------------------------------- the run

def paths(cfg):
    stem = cfg.out[:-len(".jsonl")] if cfg.out.endswith(".jsonl") else cfg.out
    summary = cfg.summary or os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "summary.json")
    return stem + ".rejected.jsonl", summary


def run(cfg: ReflectConfig, policy=None, teacher=None):
    """Build (or continue) cfg.out. policy: object with attempts(items) -> list[str] (default:
    SamplerPolicy(cfg)); teacher: object with reflect(items) -> list[TeacherReply] and a name
    (default: from cfg.teacher). Returns the summary dict."""
    if not cfg.out or not cfg.data:
        raise SystemExit("reflect_data.py: --data and --out are required")
    if cfg.correct_frac > 1:
        raise SystemExit(f"reflect_data.py: --correct-frac must be <= 1 (< 0 = no mix), got {cfg.correct_frac}")
    cfg.device = cfg.device or ("cuda" if _cuda() else "cpu")
    rejected_path, summary_path = paths(cfg)
    out_dir = os.path.dirname(os.path.abspath(cfg.out))
    os.makedirs(out_dir, exist_ok=True)

    items = load_items(cfg.data, cfg.limit)
    written, rejected = load_done(cfg.out, rejected_path)
    open(cfg.out, "a").close()  # the output exists (maybe empty) even if nothing passes
    skip = {str(r.get("id")) for r in written} | {str(r.get("id")) for r in rejected}
    todo = [it for it in items if it.id not in skip]
    counts = Counter(r.get("source") for r in written)  # samples per kind ('correct' | 'wrong') so far
    teacher = teacher or make_teacher(cfg)
    if policy is None and todo:
        if not cfg.policy:
            raise SystemExit("reflect_data.py: --policy CHECKPOINT is required")
        policy = SamplerPolicy(cfg)
    print(f"reflect_data.py: {len(items)} records, {len(items) - len(todo)} done in earlier runs "
          f"({sum(counts.values())} written, {len(rejected)} rejected), {len(todo)} to do; teacher {teacher.name}",
          file=sys.stderr)

    run_written, run_rejected, failures = Counter(), Counter(), {}
    bar = tqdm(total=len(todo), desc="reflect", unit="q")
    for b in range(0, len(todo), cfg.batch_size):
        chunk = todo[b:b + cfg.batch_size]
        cands, why = judge_attempts(chunk, policy.attempts(chunk))  # why: {id: rejection reason}
        ask = choose_attempts(chunk, cands, why, counts, cfg.correct_frac)
        replies = dict(zip([it.id for it in ask], teacher.reflect(ask))) if ask else {}
        answered = [it for it in ask if not replies[it.id].error]
        checked = dict(zip([it.id for it in answered],
                           check_samples(answered, [replies[it.id] for it in answered])))
        # in data order: a sample, a rejection, or nothing (a teacher failure, retried next run)
        for it in chunk:
            kind = "correct" if it.attempt_correct else "wrong"
            if it.id in replies and replies[it.id].error:
                failures[it.id] = replies[it.id].error
                continue
            if it.id in checked:
                text, reason = checked[it.id]
                if not reason and not within_quota(counts, kind, cfg.correct_frac):
                    reason = f"over_quota_{kind}"  # the precheck counted an item whose teacher call failed
                if not reason:
                    data.append_jsonl(cfg.out, sample_record(it, text, out_dir, teacher.name))
                    counts[kind] += 1
                    run_written[kind] += 1
                    continue
                why[it.id] = reason
            reason = why[it.id].split(":")[0]
            data.append_jsonl(rejected_path, {"id": it.id, "reason": reason, "detail": why[it.id],
                                              "attempt_correct": it.attempt_correct if it.attempt_think else None})
            run_rejected[reason] += 1
        bar.update(len(chunk))
        bar.set_postfix(correct=counts["correct"], wrong=counts["wrong"], failed=len(failures))
    bar.close()

    summary = make_summary(cfg, teacher.name, len(items), counts, Counter(r.get("reason", "?") for r in rejected),
                           len(todo), run_written, run_rejected, failures)
    _write_json_atomic(summary_path, summary)
    print(json.dumps(summary, indent=1))
    return summary


def make_summary(cfg, teacher_name, n_records, counts, old_rejected, n_todo, run_written, run_rejected, failures):
    """Everything so far (this run and earlier ones) + what this run did + what failed."""
    total = counts["correct"] + counts["wrong"]
    return dict(
        out=cfg.out, teacher=teacher_name, correct_frac=cfg.correct_frac, records=n_records,
        written=dict(correct=counts["correct"], wrong=counts["wrong"], total=total,
                     r2r=counts["correct"], w2r=counts["wrong"]),
        correct_share=round(counts["correct"] / total, 4) if total else None,
        rejected=dict(sorted((old_rejected + run_rejected).items())),
        this_run=dict(todo=n_todo, written=dict(run_written), rejected=dict(sorted(run_rejected.items())),
                      teacher_failures=len(failures)),
        teacher_failures=dict(count=len(failures), reasons=dict(Counter(_failure_kind(e) for e in failures.values())),
                              ids=sorted(failures)[:100], note="not recorded as done: the next run retries them"),
    )


def _failure_kind(error):
    return re.sub(r" \(after \d+ tries\)$", "", error)


def _cuda():
    import torch
    return torch.cuda.is_available()


def _write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_args(argv=None) -> ReflectConfig:
    return parse_config(ReflectConfig, argv, description="SRPO stage 1: reflection SFT data from the policy's attempts",
                        choices={"teacher": ["rule", "openai", "local"]})


if __name__ == "__main__":
    run(parse_args())
