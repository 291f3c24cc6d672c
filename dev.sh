#!/usr/bin/env bash
# Set up (when needed) and run: a fresh machine needs only Python 3.11+ and gcc.
#
#   ./dev.sh demo [options]    embedded broker + 7 simulated services + the aggregator
#   ./dev.sh test [pytest args] the whole test suite (unit + integration on a real broker)
#   ./dev.sh bench [args]       the benchmark harness
#   ./dev.sh run --config FILE  the service
#   ./dev.sh help               usage (sets nothing up)
#
# Set-up: a virtual environment in .venv, `pip install -e '.[test]'` (compiles the Cython
# core); redone only when pyproject.toml, setup.py or the Cython sources change.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<'EOF'
usage: ./dev.sh COMMAND [args]

  demo [options]      embedded broker + 7 simulated services + the aggregator
  test [pytest args]  the whole test suite (unit + integration on a real broker)
  bench [args]        the benchmark harness
  run --config FILE   the service (see .venv/bin/aggregator run --help)
  help                this text (sets nothing up)

The first command creates .venv (Python 3.11+ and gcc needed), installs aggregator with its
test dependencies and compiles the Cython core; that is redone only when pyproject.toml,
setup.py or the Cython sources change.
EOF
}

cmd=${1:-help}
case "$cmd" in
    demo|run|test|bench) shift ;;
    help|-h|--help) usage; exit 0 ;;
    *) echo "dev.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "dev.sh: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml setup.py aggregator/*.pyx aggregator/*.pxd \
    2>/dev/null | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "dev.sh: installing aggregator and its test dependencies (builds the Cython core)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

case "$cmd" in
    demo|run) exec .venv/bin/aggregator "$cmd" "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    bench) exec .venv/bin/python -m bench "$@" ;;
esac
