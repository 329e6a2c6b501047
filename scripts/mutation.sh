#!/usr/bin/env bash
# Mutation testing of the core (docs/testing.md): scripts/mutation.sh [--gate]
# [--changed] [--time-cap S] [--tests T...] [PATH...]. Ends with the line
# "mutation: killed K of N (R %)".
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/mutation.py "$@"
