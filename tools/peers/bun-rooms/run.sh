#!/usr/bin/env bash
# Usage: run.sh PORT   (foreground; exec so the PID is the server's). Runs BUN if set, else the bun setup.sh
# installed into ./node_modules, else a bun on PATH.
set -euo pipefail
cd "$(dirname "$0")"
bun="${BUN:-}"
if [[ -z "$bun" ]]; then
  if [[ -x node_modules/.bin/bun ]]; then bun=node_modules/.bin/bun; else bun=$(command -v bun || true); fi
fi
[[ -n "$bun" ]] || { echo "run.sh: no bun: run setup.sh first" >&2; exit 1; }
exec "$bun" run server.ts "${1:?usage: run.sh PORT}"
