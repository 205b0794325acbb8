"""
Why a compiled decode step gave garbage under ATEN_CPU_CAPABILITY=avx2 after a native run filled
inductor's cache, shown on a tiny function in three fresh processes sharing one cache directory:

  1. fill:     inductor believes the CPU is AVX-512 (as a native run on an AVX-512 machine does) and
               writes C++ with loops of 16 floats (Vectorized<float>::loadu(p, 16)) into the cache.
               On a CPU without AVX-512 this process then dies of SIGILL, after the entry is saved;
  2. untagged: a process whose vector ISA is AVX2 (an AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2):
               inductor's FX graph cache key names neither the ISA nor ATEN_CPU_CAPABILITY, so the
               entry is a HIT; its C++ is recompiled with -mavx2, where Vectorized<float> holds 8
               floats, and loads and stores of 16 touch the wrong elements: NaN or garbage, no error;
  3. tagged:   the same after sampler.key_compile_cache() (the ISA in the cache key): a MISS, and a
               correct result.

    python bench/inductor_isa_cache.py [--dir DIR]      # ~1 min; prints one line per process

--eval MODEL DATA: the same on eval.py (greedy, the sampler's compiled decode step) of a trained
model, its accuracy and lengths compared with an eager run: eager; compiled on a cold cache;
compiled under ATEN_CPU_CAPABILITY=avx2 on that warm cache; an AVX-512 cache written without the
ISA in the key, then read under avx2 (the self-check must catch it); the same with the ISA in the
key (a miss). Prints the seconds the self-check took in each run (~10-15 min on 2 loaded cores):

    python bench/inductor_isa_cache.py --eval RUN/base RUN/task/test.jsonl
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(mode):
    import torch
    import torch._inductor.cpu_vec_isa as V
    from torch._dynamo.utils import counters
    if mode == "fill":  # every place inductor asks for the ISA answers AVX-512
        import torch._inductor.codecache as cc
        import torch._inductor.codegen.cpp as cp
        import torch._inductor.cpp_builder as cb
        fake = V.VecAVX512()
        for mod in (V, cc, cp, cb):
            if hasattr(mod, "pick_vec_isa"):
                mod.pick_vec_isa = lambda: fake
    if mode == "tagged":
        sys.path.insert(0, ROOT)
        import sampler
        sampler.key_compile_cache()

    def f(x, w):  # an RMSNorm-and-softmax-like kernel: elementwise, reductions
        return torch.softmax(x * w, -1) + torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 1000, generator=g), torch.randn(1000, generator=g)
    y = torch.compile(f)(x, w)
    err = float((y - f(x, w)).abs().max())
    hit = "cache hit" if counters["inductor"]["fxgraph_cache_hit"] else "cache miss"
    print(f"{mode}: isa {V.pick_vec_isa()}, {hit}, max |compiled - eager| = {err:.3g}: "
          f"{'correct' if err < 1e-5 else 'WRONG'}", flush=True)


def eval_child(mode, argv):
    """eval.py in this process; mode: plain | fake512 (inductor believes the CPU is AVX-512) |
    notag (sampler.key_compile_cache disabled) | fake512notag."""
    import atexit
    import runpy
    sys.path.insert(0, ROOT)
    import sampler
    if "fake512" in mode:
        import torch._inductor.codecache as cc
        import torch._inductor.codegen.cpp as cp
        import torch._inductor.cpp_builder as cb
        import torch._inductor.cpu_vec_isa as V
        fake = V.VecAVX512()
        for mod in (V, cc, cp, cb):
            if hasattr(mod, "pick_vec_isa"):
                mod.pick_vec_isa = lambda: fake
    if "notag" in mode:
        sampler.key_compile_cache = lambda: None
    atexit.register(lambda: print(f"self-check {sampler._cascade_step.check_s if sampler._cascade_step else 0:.3f} s, "
                                  f"fell back to eager: {bool(sampler._cascade_step and sampler._cascade_step.failed)}",
                                  flush=True))
    sys.argv = ["eval.py"] + argv
    runpy.run_path(os.path.join(ROOT, "eval.py"), run_name="__main__")


def eval_runs(model, data_file, work):
    import json
    common = ["--model", model, "--data", data_file, "--prompt", "single", "--batch-size", "64", "--max-new-tokens", "256"]
    runs = [("eager", "plain", "c1", {"SRPO_COMPILE": "0"}), ("compiled, cold cache", "plain", "c1", {}),
            ("compiled, warm cache, avx2", "plain", "c1", {"ATEN_CPU_CAPABILITY": "avx2"}),
            ("fill: AVX-512 code, ISA not in key", "fake512notag", "c2", {}),
            ("that cache under avx2, ISA not in key", "notag", "c2", {"ATEN_CPU_CAPABILITY": "avx2"}),
            ("fill: AVX-512 code, ISA in key", "fake512", "c3", {}),
            ("that cache under avx2, ISA in key", "plain", "c3", {"ATEN_CPU_CAPABILITY": "avx2"})]
    ref = None
    for i, (label, mode, cache, env) in enumerate(runs):
        out = os.path.join(work, f"run{i}")
        t0 = time.time()
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "eval:" + mode, "--", *common, "--out", out],
                           env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(work, cache), **env),
                           capture_output=True, text=True, cwd=ROOT)
        wall = time.time() - t0
        if mode.startswith("fake512"):
            print(f"{label}: exit {r.returncode} ({'SIGILL: no AVX-512 here' if r.returncode in (-4, 132) else 'ran'}), {wall:.0f} s")
            continue
        if r.returncode != 0:
            sys.exit(f"bench/inductor_isa_cache.py: {label} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        res = json.load(open(os.path.join(out, "metrics.json")))["results"][0]["metrics"]
        rows = [json.loads(ln) for f in sorted(os.listdir(os.path.join(out, "predictions")))
                for ln in open(os.path.join(out, "predictions", f))]
        got = ([r_["length"] for r_ in rows], [r_["response"] for r_ in rows])
        ref = ref or got
        check = [ln for ln in r.stdout.splitlines() if ln.startswith("self-check")]
        print(f"{label}: final_acc {res['final_acc']:.4f}, mean_len {res['mean_len']:.3f}, lengths and responses "
              f"{'==' if got == ref else '!='} eager's; {check[0] if check else ''}; warned: {'WARNING' in r.stderr}; "
              f"wall {wall:.0f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="", help="scratch dir for the inductor cache (default: a temp dir)")
    ap.add_argument("--eval", nargs=2, metavar=("MODEL", "DATA"), help="the eval.py runs (see above)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child.startswith("eval:"):
        return eval_child(args.child[5:], [a for a in rest if a != "--"])
    if args.child:
        return child(args.child)
    if args.eval:
        with tempfile.TemporaryDirectory() as tmp:
            return eval_runs(*args.eval, args.dir or tmp)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(args.dir or tmp, "inductor"),
                   TORCHINDUCTOR_FX_GRAPH_CACHE="1")
        for mode in ("fill", "untagged", "tagged"):
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode], env=env,
                               capture_output=True, text=True)
            out = r.stdout.strip()
            if mode == "fill" and r.returncode in (-4, 132):
                out = "fill: the AVX-512 code died of SIGILL on this CPU after its cache entry was written"
            elif r.returncode != 0:
                sys.exit(f"bench/inductor_isa_cache.py: {mode} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
            print(out, flush=True)


if __name__ == "__main__":
    main()
