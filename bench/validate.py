"""Cost of checking every record at the start of a run (data.validate_records) on the built-in task.

    python task.py --out /tmp/task                       # 16k train records, one PNG each (~20 s)
    python bench/validate.py --task /tmp/task [--tokenizer runs/demo/base]

Times, in the same process: reading train.jsonl (the baseline every run pays), then
data.load_records with the tokenizer (grpo.py's load: schema, NaN / Infinity, control tokens,
ground truths, every image opened, pixel-capped and checked to decode, every prompt's tokens
counted), then the images alone. Prints wall and CPU seconds (on a shared machine the CPU time is
the cost; wall time includes waiting for a core) and the ratio to the read.
Without --tokenizer a tiny one is trained on the task's questions first (not timed).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import data  # noqa: E402


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="/tmp/task", help="directory of `python task.py --out DIR`")
    ap.add_argument("--tokenizer", default="", help="checkpoint dir with tokenizer.json (default: train a tiny one)")
    args = ap.parse_args()
    path = os.path.join(args.task, "train.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"bench/validate.py: {path} not found; make it with: python task.py --out {args.task}")
    pairs, t_read, c_read = timed(lambda: data.read_jsonl_numbered(path))
    if args.tokenizer:
        tok = data.Tokenizer.from_dir(args.tokenizer)
    else:
        texts = [data.SYSTEM_PROMPT_REFLECT] + [r.get("question", "") for _, r in pairs[:2000]]
        tok = data.train_tokenizer(texts, tempfile.mkdtemp(), vocab_size=600)
    recs, t_all, c_all = timed(lambda: data.load_records(path, tok, data.SYSTEM_PROMPT_REFLECT))
    paths = {os.path.join(args.task, p["image"]) for _, r in pairs for m in r["messages"]
             if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image"}
    _, t_img, c_img = timed(lambda: [data.check_image_file(p) for p in paths])
    print(f"{len(pairs)} records, {len(paths)} images")
    print(f"read train.jsonl            wall {t_read:6.2f} s  cpu {c_read:6.2f} s")
    print(f"load_records (all checks)   wall {t_all:6.2f} s  cpu {c_all:6.2f} s  ({c_all / max(c_read, 1e-9):.1f}x the read, cpu)")
    print(f"  of which the images       wall {t_img:6.2f} s  cpu {c_img:6.2f} s")
    assert len(recs) == len(pairs)


if __name__ == "__main__":
    main()
