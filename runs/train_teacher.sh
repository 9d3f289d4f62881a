#!/usr/bin/env bash
# The exact command that trained the shipped toy teacher (src/safeprune/assets/teacher/), with the default
# config (see runs/teacher/config.yaml once it has run). Resumable: run it again after an interruption.
set -euo pipefail
out=${1:-runs/teacher}
resume=$([ -d "$out/checkpoints" ] && echo --resume || true)
safeprune pretrain teacher --out "$out" $resume
rm -rf src/safeprune/assets/teacher && cp -r "$out/pipeline" src/safeprune/assets/teacher
