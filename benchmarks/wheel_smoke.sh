#!/usr/bin/env bash
# Issue 14's first acceptance check, as a new user meets the project: the wheel installed in a fresh venv,
# used from a folder outside any repository. Checks that `import safeprune` is the venv's copy (not a source
# checkout), that `safeprune presets`, `safeprune finetune --config sd21 --dry-run` and `safeprune demo --dry-run`
# work and write nothing, and that the venv holds a CPU torch and no torchvision. It does NOT run the full demo.
#
#   benchmarks/wheel_smoke.sh VENV WHEEL_DIR
#
# VENV: created (python3 -m venv) and installed with the wheel + extras eval,nudenet,onnx (and clean-fid with
# --no-deps, as the Makefile does) when it does not exist; an existing VENV is reused only if this script made
# it (its marker file .wheel_smoke), with the newest wheel reinstalled. WHEEL_DIR: the safeprune-*.whl to test;
# when it holds none, the wheel is built there from `git archive HEAD` (committed files only, no build/ or
# *.egg-info left in the checkout). CONSTRAINTS (default: the repository's constraints-cpu.txt, which pins the
# CPU torch; set CONSTRAINTS= on a CUDA machine) is passed to every pip call. Exits non-zero on the first failure.
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 VENV WHEEL_DIR" >&2; exit 2; }
venv=$(realpath -m "$1")
wheels=$(realpath -m "$2")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints=${CONSTRAINTS-$repo/constraints-cpu.txt}
pip_c=()
[[ -n $constraints ]] && pip_c=(-c "$constraints")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

fail() { echo "wheel_smoke: FAIL: $*" >&2; exit 1; }
step() { echo "wheel_smoke: $*"; }

case $venv/ in "$repo"/*) fail "VENV $venv lies inside the repository; pass a path outside it" ;; esac

# 1. the venv: fresh, or one this script made before
if [[ -e $venv ]]; then
    [[ -f $venv/.wheel_smoke ]] || fail "$venv exists and was not made by this script; pass a new path"
    fresh=0
else
    python3 -m venv "$venv"
    touch "$venv/.wheel_smoke"
    fresh=1
fi
py=$venv/bin/python

# 2. the wheel
mkdir -p "$wheels"
if ! compgen -G "$wheels/safeprune-*.whl" > /dev/null; then
    src=$(mktemp -d)
    git -C "$repo" archive HEAD | tar -x -C "$src"
    step "building the wheel from $(git -C "$repo" rev-parse --short HEAD) into $wheels"
    "$py" -m pip wheel -q --no-deps -w "$wheels" "$src"
    rm -rf "$src"
fi
wheel=$(ls -t "$wheels"/safeprune-*.whl | head -1)
step "wheel: $wheel"

# 3. install: the wheel with its extras (deps from the package index under the constraints), clean-fid bare
if [[ $fresh == 1 ]]; then
    "$py" -m pip install -q "${pip_c[@]}" "$wheel[eval,nudenet,onnx]"
    "$py" -m pip install -q "${pip_c[@]}" --no-deps clean-fid  # its torchvision dependency is never imported
else
    "$py" -m pip install -q "${pip_c[@]}" --no-deps --force-reinstall "$wheel"
fi

# 4. the checks, from an empty folder outside any repository
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if git rev-parse --git-dir > /dev/null 2>&1; then fail "$work lies inside a git repository"; fi

where=$("$py" -c "import safeprune; print(safeprune.__file__)")
case $where in "$venv"/lib/*/site-packages/safeprune/*) step "import safeprune -> $where" ;;
    *) fail "import safeprune resolves to $where, not the venv's site-packages" ;; esac
"$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is not None)" \
    || fail "torchvision is installed in $venv (it breaks this torch)"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

cli=$venv/bin/safeprune
[[ -x $cli ]] || fail "the wheel installed no safeprune command"
out=$("$cli" presets) || fail "safeprune presets exited $?"
grep -q sd21 <<< "$out" || fail "safeprune presets does not list sd21: $out"
step "safeprune presets: ok ($(wc -l <<< "$out") lines)"

out=$("$cli" finetune --config sd21 --dry-run) || fail "safeprune finetune --config sd21 --dry-run exited $?"
grep -q "max_steps: 20000" <<< "$out" || fail "the sd21 preset did not resolve (no max_steps: 20000)"
grep -q "global batch" <<< "$out" || fail "the dry run printed no derived launch figures"
grep -q "teacher: stabilityai/stable-diffusion-2-1" <<< "$out" || fail "the dry run names no SD 2.1 teacher"
step "safeprune finetune --config sd21 --dry-run: ok"

out=$("$cli" demo --dry-run) || fail "safeprune demo --dry-run exited $?"
grep -q "^demo:" <<< "$out" || fail "safeprune demo --dry-run printed no demo section"
step "safeprune demo --dry-run: ok"

[[ -z $(ls -A "$work") ]] || fail "a dry run wrote into $work: $(ls -A "$work")"
step "all checks passed ($venv)"
