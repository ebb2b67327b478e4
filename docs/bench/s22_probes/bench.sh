#!/bin/bash
# session 22 benchmarks, one at a time: c=1 (three modes), DSPARK block cap 5 vs 7 at c=1
# (alternating), c=32
set -x
cd /work/main && . .venv/bin/activate
R=/work/runs/s22
while pgrep -f "eval_drafter|train_drafter" > /dev/null; do sleep 5; done
B="python -m dspark_sglang.bench_speculative --num-threads 2"
$B --modes NONE MTP1 DSPARK --concurrency 1 --prompts-per-file 3 --profile-steps --rounds 3 --output $R/spec_c1.json > $R/spec_c1.log 2>&1
for i in 1 2; do
  $B --modes NONE DSPARK --concurrency 1 --prompts-per-file 3 --profile-steps --rounds 2 --server-arg speculative_num_draft_tokens=6 --output $R/cap5_$i.json > $R/cap5_$i.log 2>&1
  $B --modes NONE DSPARK --concurrency 1 --prompts-per-file 3 --profile-steps --rounds 2 --output $R/cap7_$i.json > $R/cap7_$i.log 2>&1
done
$B --modes NONE DSPARK --concurrency 32 --prompts-per-file 7 --profile-steps --rounds 3 --output $R/spec_c32.json > $R/spec_c32.log 2>&1
echo done > $R/bench.done
