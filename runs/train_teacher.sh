#!/usr/bin/env bash
# The exact command that trained the shipped toy teacher (src/safeprune/assets/teacher/), with the default
# config (recorded in docs/teacher/config.yaml). Resumable: run it again after an interruption.
# History of the shipped weights: started with 2 threads, stopped after VAE step 500 and resumed with
# OMP_NUM_THREADS=1 (two OpenMP threads on a core shared with other jobs ran 10x slower); resume is exact.
# The shipped tokenizer was built by the `tokenizers` BPE trainer, whose tie-breaking is not deterministic;
# the tokenizer is now built deterministically, so a re-run trains equivalent but not bit-identical weights.
set -euo pipefail
out=${1:-runs/teacher}
resume=$([ -d "$out/checkpoints" ] && echo --resume || true)
safeprune pretrain teacher --out "$out" $resume
rm -rf src/safeprune/assets/teacher && cp -r "$out/pipeline" src/safeprune/assets/teacher
