#!/usr/bin/env bash
# The checks of a session that is lent a CUDA machine, in priority order, each under its own time
# limit so that one stuck stage cannot eat the others' time: the cce head's exactness beside
# Apple's and Liger's kernels, `llmtrain bench heads` at Gemma 2 2B's shape (the CCE paper's
# Table 1) and at issue 8's shape, then the trainer with a small Hugging Face model (softmax and
# cce heads). Results go to $OUT (default ./cuda-out); BENCHMARKS.md "On a GPU" records them.
#
# The machine reaches no package index: packages its image lacks travel as wheels in .whl/
# (pydantic, hjson, cut-cross-entropy, liger-kernel), DeepSpeed as its installed package in
# .whl/ds/ (it ships no wheel). BASELINE, if set, is another llmtrain tree whose heads run beside
# this one's in the bench (`--baseline`). STAGES picks stages (default: all, in this order; they
# took 45 s (cut), 163, 85, 2 × 70 and >70 s (cut) on an H200, after ~60 s of machine start).
set -u
STAGES=${STAGES:-"exactness gemma target train fp32"}
want() { [[ " $STAGES " == *" $1 "* ]]; }
OUT=${OUT:-cuda-out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
say() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
stage() {  # stage SECONDS command...: its output in the log, its failure noted, the next one runs
  local limit=$1; shift
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -40
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || say "exit $rc: $*"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { say "wheels did not install"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/.whl/ds:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOG"
python3 -c "import torch, triton, transformers, deepspeed, liger_kernel, cut_cross_entropy, llmtrain
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'deepspeed', deepspeed.__version__, 'llmtrain', llmtrain.__version__)" 2>&1 | tail -3 | tee -a "$LOG"
BENCH=(python3 -m llmtrain.cli bench heads --device cuda --repeats 5 --timeout 100)
[ -n "${BASELINE:-}" ] && BENCH+=(--baseline "$BASELINE")

if want exactness; then say "exactness"
stage 60 python3 benchmarks/cuda_exactness.py --shapes 1000x50000x256 4096x131072x1024
fi
if want gemma; then say "heads, Gemma 2 2B shape, bf16"
stage 170 "${BENCH[@]}" --tokens 8192 --vocab 256000 --hidden 2304 --dtype bf16 --heads cce,hsm \
  --peers torch-eager,apple-cce,liger,torch-linear-ce --json "$OUT/heads-gemma-bf16.json"
fi
if want target; then say "heads, issue 8 shape, bf16"
stage 100 "${BENCH[@]}" --tokens 4096 --vocab 65536 --hidden 512 --dtype bf16 --heads cce \
  --peers torch-eager,apple-cce,apple-cce-compile,liger,torch-linear-ce --json "$OUT/heads-target-bf16.json"
fi

if want train; then say "trainer: a Qwen2 body (8 × 512, vocabulary 32,768) from a config-only folder, bf16, 1 GPU"
python3 - <<'EOF'
from transformers import Qwen2Config
Qwen2Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=32768, max_position_embeddings=1024,
            tie_word_embeddings=False).save_pretrained("/tmp/cuda-qwen2")
EOF
cat > /tmp/cuda-qwen2.yaml <<'EOF'
name: cuda-qwen2
model: {hf: /tmp/cuda-qwen2, seq_len: 1024}
head: {type: cce}
data: {source: stdlib, max_bytes: 12000000, cache_dir: /tmp/cuda-cache}
tokenizer: {vocab_size: 32768}
train: {steps: 40, micro_batch: 8, precision: bf16, lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 4, log_every: 5}
deepspeed: {zero_stage: 2, config: {optimizer: {params: {torch_adam: true}}}}
checkpoint: {every: 40}
eval: {every: 40, batches: 4}
launch: {launcher: deepspeed, ranks_per_node: 1}
EOF
for head in softmax cce; do
  stage 85 python3 -m llmtrain.cli run /tmp/cuda-qwen2.yaml head.type=$head --out /tmp/cuda-run-$head
  cp /tmp/cuda-run-$head/metrics.jsonl "$OUT/train-$head.jsonl" 2>/dev/null
done
fi

if want fp32; then say "heads, issue 8 shape, fp32"
stage 120 "${BENCH[@]}" --tokens 4096 --vocab 65536 --hidden 512 --dtype fp32 --heads cce \
  --peers torch-eager,apple-cce,apple-cce-compile,liger,torch-linear-ce --json "$OUT/heads-target-fp32.json"
fi
say "done"
