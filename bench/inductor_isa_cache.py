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
"""
import argparse
import os
import subprocess
import sys
import tempfile

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="", help="scratch dir for the inductor cache (default: a temp dir)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
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
