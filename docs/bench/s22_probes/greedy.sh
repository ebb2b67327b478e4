#!/bin/bash
# data-quality ablation: the control's domain counts and token volume, greedy answers only
set -x
cd /work/main && . .venv/bin/activate
R=/work/runs/s22
COMMON="--cache-dtype bfloat16 --num-threads 2 --block-size 7 --markov-rank 64 --max-seq-len 1024 --batch-seqs 16 --anchors-per-seq 16 --target-layer-ids 1,8,14,20,27 --token-map $R/map.json"
SHIP=dspark_sglang/assets/drafters/smollm2_135m
TRAIN="--stages train --steps 400 --lr 0.0002 --warmup-steps 20 --ckpt-every 100 --ce-label target --alpha-ce 0.5 --alpha-tv 0.5 --calib-max-seqs 128 --max-minutes 20 --no-resume --init-from $SHIP"
python -m dspark_sglang.train_drafter --work-dir $R/WG --out $R/OUT_Gcache --stages cache --num-layers 2 $COMMON > $R/cache_G.log 2>&1
python -m dspark_sglang.train_drafter --work-dir $R/WG --out $R/OUT_G --num-layers 2 $COMMON $TRAIN > $R/train_G.log 2>&1
python -m dspark_sglang.eval_drafter --drafter $SHIP --compare $R/OUT_A $R/OUT_G --num 10 --max-new-tokens 128 --num-threads 2 --out $R/greedy_eval10.json > $R/greedy_eval10.log 2>&1
echo done > $R/greedy.done
