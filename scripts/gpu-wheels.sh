#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, transformers and peft but not the reference (diffusers), the
# 8-bit attention kernel (sageattention, pure Python: its Triton comes with the CUDA build of torch) nor
# FlashAttention-3 (fa3-fwd: CUDA 13, PyTorch 2.10+ through its stable ABI; 28 MB, the largest of them: with
# the tree, 64 of the 67 MB that one device call carries):
# downloads them into .whl/ for Python 3.12 on x86-64 Linux; benchmarks/gpu_session.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
# .whl/ stays out of git status; in a worktree (where .git is a file) the exclude file is the main one's
if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata sageattention==1.0.6 fa3-fwd==0.0.3 "${@}"
ls -la .whl
