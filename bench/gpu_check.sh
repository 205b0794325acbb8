#!/usr/bin/env bash
# GPU check: the tiny model through every stage on CUDA, bf16, NCCL on all visible GPUs; prints
# PASS or FAIL per check and exits non-zero on any FAIL. Never run by CI (no GPU there); run it on
# the first machine with CUDA before a real 7B job:
#
#     bash bench/gpu_check.sh [WORKDIR]          # ~3-5 min on one GPU
#
# What it checks: the task and tokenizer build; sft.py from scratch under torchrun (FSDP2 + NCCL);
# grpo.py under torchrun with a reference model (beta > 0) and logp_old recomputed by the training
# forward; every logged number finite; at step 1 the KL to the reference (identical weights, the same
# FSDP2 bf16 path) and the clipping are ~0; the sharded checkpoint of the N-GPU run resumes on ONE GPU;
# eval.py on the GPU; the memory plan prints; bench/gpu_sampler.py (the sampler against transformers).
set -uo pipefail
cd "$(dirname "$0")/.."
D=${1:-/tmp/srpo_gpu_check}
N=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
fail=0
check() { if eval "$2"; then echo "PASS  $1"; else echo "FAIL  $1"; fail=1; fi; }
DEV=cuda
if [ "${GPU_CHECK_ON_CPU:-0}" = 1 ]; then N=1; DEV=cpu; echo "gpu_check: dry run of the commands on the CPU (fp32, gloo)";
elif [ "$N" -lt 1 ]; then echo "FAIL  no CUDA device visible (GPU_CHECK_ON_CPU=1 dry-runs the commands on the CPU)"; exit 1; fi
echo "gpu_check: $N GPU(s), work dir $D"
rm -rf "$D" && mkdir -p "$D"
run() { echo "+ $*" >> "$D/commands.log"; "$@" >> "$D/output.log" 2>&1; }
TR=(torchrun --standalone --nproc_per_node="$N")

check "demo/task.py builds the task" "run python -m demo.task --out $D/task --n-train 64 --n-test 16 --n-val 0"
check "sft.py from scratch, FSDP2 on $N GPU(s)" \
  "run ${TR[*]} sft.py --data $D/task/train.jsonl --tokenizer_corpus $D/task/tokenizer_corpus.jsonl --out $D/base \
   --max_steps 40 --batch_size $((8 * N)) --micro_batch_size 8 --warmup_steps 4"
check "grpo.py, bf16 rollout, reference, recomputed logp_old, FSDP2 on $N GPU(s)" \
  "run ${TR[*]} grpo.py --model $D/base --train $D/task/train.jsonl --out $D/grpo --reward grpo --steps 2 \
   --prompts_per_step $((2 * N)) --group_size 4 --n_minibatches 1 --rollout_batch 2 --max_new_tokens 64 \
   --beta 0.04 --logp_old recompute --save_every 1"
check "grpo log: every number finite, KL(ref) and logp_old mismatch small at step 1" "python - $D/grpo/log.jsonl <<'PY'
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
nums = [v for r in recs for v in r.values() if isinstance(v, (int, float))]
assert recs and all(math.isfinite(v) for v in nums), 'non-finite value in log.jsonl'
first = recs[0]
print('  step 1:', {k: first.get(k) for k in ('kl_ref', 'kl_old', 'clip_frac', 'logp_old_mismatch')})
assert first.get('kl_ref', 0.0) <= 1e-5, 'policy and reference differ at step 1 (same weights, same path)'
assert first.get('clip_frac', 0.0) <= 1e-3, 'spurious clipping at step 1: logp_old not from the training forward?'
PY"
check "grpo.py resumes the $N-GPU sharded checkpoint on 1 GPU (DCP)" \
  "run torchrun --standalone --nproc_per_node=1 grpo.py --model $D/base --train $D/task/train.jsonl --out $D/grpo \
   --reward grpo --steps 3 --prompts_per_step $((2 * N)) --group_size 4 --n_minibatches 1 --rollout_batch 2 \
   --max_new_tokens 64 --beta 0.04 --logp_old recompute --save_every 1 \
   && python -c \"import json; s = json.load(open('$D/grpo/checkpoint/train_state.json')); assert s['step'] == 3, s\""
check "eval.py on $DEV" "run python eval.py --model $D/grpo --data $D/task/test.jsonl --prompt single --out $D/eval --limit 16 --device $DEV"
check "support/memory.py prints the 7B plan" "run python -m support.memory --world_size 8"
# the sampler on the GPU: 7B shapes, random bf16 weights, ours (static + CUDA graph) vs transformers
# generate, ms/step against the bandwidth bound (~5-8 min on an H200; GPU_CHECK_SAMPLER=0 skips it)
if [ "${GPU_CHECK_SAMPLER:-1}" = 1 ]; then
  if [ "$DEV" = cpu ]; then SHAPE="--shape tiny --device cpu --prompts 2 --samples 2 --new 16 --reps 1"; else SHAPE="--shape 7b"; fi
  check "bench/gpu_sampler.py $SHAPE (results in $D/gpu_sampler.log)" \
    "python bench/gpu_sampler.py $SHAPE > $D/gpu_sampler.log 2>&1; rc=\$?; cat $D/gpu_sampler.log; [ \$rc -eq 0 ]"
fi
echo "gpu_check: logs in $D/output.log"
[ "$fail" -eq 0 ] && echo "gpu_check: PASS" || echo "gpu_check: FAIL"
exit $fail
