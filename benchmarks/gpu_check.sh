#!/usr/bin/env bash
# The GPU check of the speed issue, ready for a machine with one GPU (see benchmarks/README.md):
# P3O-V2 + LoRA in bf16 on SmolLM2-135M-Instruct for 10 steps on the vLLM backend (skipped, and said
# so, where vLLM is not installed), then on the transformers backend (eager, then with --compile_sampling:
# one CUDA graph per decoded token), then TRL's RLOO with vLLM colocated
# (where TRL and vLLM are installed), and TRL's RLOO on transformers generation, the same-GPU peer of p3o's
# transformers row; responses/s, peak GPU memory and p3o's phase times.
#   bash benchmarks/gpu_check.sh DIR   # DIR: `p3o fetch-model smollm2 --output_dir DIR`, or a folder with
#                                      # only config.json + tokenizer files (random weights, real shapes)
#   bash benchmarks/gpu_check.sh DIR --steps 3   # further arguments go to gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_LOGGING_LEVEL=WARNING
nvidia-smi -L
# each row runs in its own process under its own limit (gpu_check.py --row_seconds, --budget_seconds);
# this outer limit only catches a hang outside them
timeout 480 python3 benchmarks/gpu_check.py --model "${1:?give the SmolLM2 checkpoint directory}" --steps 10 \
    --prompts 64 --new_tokens 128 "${@:2}"
