#!/usr/bin/env bash
# The quick start: build a tiny Llama model offline, then train it with P3O-V2 to use colour words.
# (`make demo` runs the whole SFT -> RM -> RL pipeline on an embedded task.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-runs/quickstart}"
rm -rf "$out"
p3o tiny-model --corpus "$here/words.txt" --arch llama --num_layers 2 --output_dir "$out/init"
p3o train --algo p3o-v2 --model_name_or_path "$out/init" --dataset "$here/prompts.jsonl" \
  --reward_fn "$here/reward.py:colour_words" --output_dir "$out/p3o-v2" --seed 0 \
  --max_steps 30 --pairs_per_step 32 --max_new_tokens 8 --learning_rate 1e-3 --logging_steps 10
python - "$out/p3o-v2/metrics.jsonl" <<'PY'
import json, sys
m = [json.loads(line) for line in open(sys.argv[1])]
print(f"colour words per response: {m[0]['reward']:.2f} at step 1 -> {m[-1]['reward']:.2f} at step {m[-1]['step']}"
      f" (KL to the start {m[-1]['kl']:.2f} nats)")
PY
