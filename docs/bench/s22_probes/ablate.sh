#!/bin/bash
# session 22 ablations: cache 1.3M tokens (3,867 random sequences of the committed data), then
# 400 steps each from the shipped (thirteenth) drafter: A control, B gated Markov, C 1 layer
set -x
cd /work/main && . .venv/bin/activate
while pgrep -f "eval_drafter" > /dev/null; do sleep 10; done
R=/work/runs/s22
COMMON="--cache-dtype bfloat16 --num-threads 2 --block-size 7 --markov-rank 64 --max-seq-len 1024 --batch-seqs 16 --anchors-per-seq 16 --target-layer-ids 1,8,14,20,27 --token-map $R/map.json"
python -m dspark_sglang.train_drafter --work-dir $R/W --out $R/OUT_cache --stages cache --num-layers 2 $COMMON > $R/cache.log 2>&1
SHIP=dspark_sglang/assets/drafters/smollm2_135m
TRAIN="--stages train --steps 400 --lr 0.0002 --warmup-steps 20 --ckpt-every 100 --ce-label target --alpha-ce 0.5 --alpha-tv 0.5 --calib-max-seqs 128 --max-minutes 20 --no-resume --init-from $SHIP"
for v in A B C; do
  mkdir -p $R/W_$v; ln -sfn $R/W/cache $R/W_$v/cache; ln -sfn $R/W/data.jsonl $R/W_$v/data.jsonl
done
python -m dspark_sglang.train_drafter --work-dir $R/W_A --out $R/OUT_A --num-layers 2 $COMMON $TRAIN > $R/train_A.log 2>&1
python -m dspark_sglang.train_drafter --work-dir $R/W_B --out $R/OUT_B --num-layers 2 --markov-head-type gated $COMMON $TRAIN > $R/train_B.log 2>&1
python -m dspark_sglang.train_drafter --work-dir $R/W_C --out $R/OUT_C --num-layers 1 $COMMON $TRAIN > $R/train_C.log 2>&1
echo done > $R/ablate.done
