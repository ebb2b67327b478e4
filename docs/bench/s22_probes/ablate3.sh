#!/bin/bash
set -x
cd /work/main && . .venv/bin/activate
R=/work/runs/s22
while pgrep -f "train_drafter" > /dev/null; do sleep 5; done
COMMON="--cache-dtype bfloat16 --num-threads 2 --block-size 7 --markov-rank 64 --max-seq-len 1024 --batch-seqs 16 --anchors-per-seq 16 --target-layer-ids 1,8,14,20,27 --token-map $R/map.json"
SHIP=dspark_sglang/assets/drafters/smollm2_135m
TRAIN="--stages train --steps 400 --lr 0.0002 --warmup-steps 20 --ckpt-every 100 --ce-label target --alpha-ce 0.5 --alpha-tv 0.5 --calib-max-seqs 128 --max-minutes 20 --no-resume --init-from $SHIP"
mkdir -p $R/W_E; ln -sfn $R/W/cache $R/W_E/cache; ln -sfn $R/W/data.jsonl $R/W_E/data.jsonl
python -m dspark_sglang.train_drafter --work-dir $R/W_E --out $R/OUT_E --num-layers 2 --markov-head-type gated $COMMON $TRAIN > $R/train_E.log 2>&1
python -m dspark_sglang.eval_drafter --drafter $SHIP --compare $R/OUT_A $R/OUT_E $R/OUT_C $R/OUT_D --num 10 --max-new-tokens 128 --num-threads 2 --out $R/ablate_eval10.json > $R/ablate_eval10.log 2>&1
echo done > $R/ablate3.done
