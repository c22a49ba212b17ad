#!/usr/bin/env bash
# Set up, then run the test suite. Extra arguments go to pytest (e.g. -m "not slow").
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" -m pytest "$@"
