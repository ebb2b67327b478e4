#!/bin/bash
# session 22, after ablate.sh: the RNN (D) and gated (E) Markov heads, 400 steps each from the
# thirteenth on ablate.sh's cache, then the paired evals; and the greedy-only data run (G: the
# control's recipe, domain counts and token volume, greedy answers only; WG/data.jsonl picked
# from the committed data, seed 23). (Run as three scripts in the session; the gated run B of
# ablate.sh used gates opened by a +4 bias and is superseded by E.)
set -x
cd /work/main && . .venv/bin/activate
R=/work/runs/s22
COMMON="--cache-dtype bfloat16 --num-threads 2 --block-size 7 --markov-rank 64 --max-seq-len 1024 --batch-seqs 16 --anchors-per-seq 16 --target-layer-ids 1,8,14,20,27 --token-map $R/map.json"
SHIP=dspark_sglang/assets/drafters/smollm2_135m
TRAIN="--stages train --steps 400 --lr 0.0002 --warmup-steps 20 --ckpt-every 100 --ce-label target --alpha-ce 0.5 --alpha-tv 0.5 --calib-max-seqs 128 --max-minutes 20 --no-resume --init-from $SHIP"
for v in D E; do
  mkdir -p $R/W_$v; ln -sfn $R/W/cache $R/W_$v/cache; ln -sfn $R/W/data.jsonl $R/W_$v/data.jsonl
done
python -m dspark_sglang.train_drafter --work-dir $R/W_D --out $R/OUT_D --num-layers 2 --markov-head-type rnn $COMMON $TRAIN > $R/train_D.log 2>&1
python -m dspark_sglang.train_drafter --work-dir $R/W_E --out $R/OUT_E --num-layers 2 --markov-head-type gated $COMMON $TRAIN > $R/train_E.log 2>&1
EVAL="python -m dspark_sglang.eval_drafter --drafter $SHIP --max-new-tokens 128 --num-threads 2"
$EVAL --compare $R/OUT_A $R/OUT_E $R/OUT_C $R/OUT_D --num 10 --out $R/ablate_eval10.json > $R/ablate_eval10.log 2>&1
$EVAL --compare $R/OUT_A $R/OUT_D $R/OUT_E --num 30 --out $R/ablate_eval30.json > $R/ablate_eval30.log 2>&1
python -m dspark_sglang.train_drafter --work-dir $R/WG --out $R/OUT_Gcache --stages cache --num-layers 2 $COMMON > $R/cache_G.log 2>&1
python -m dspark_sglang.train_drafter --work-dir $R/WG --out $R/OUT_G --num-layers 2 $COMMON $TRAIN > $R/train_G.log 2>&1
$EVAL --compare $R/OUT_A $R/OUT_G --num 10 --out $R/greedy_eval10.json > $R/greedy_eval10.log 2>&1
