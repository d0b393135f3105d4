#!/usr/bin/env bash
# Installs Bun for this peer: from the npm package `bun` into ./node_modules (its platform binary comes from
# @oven/bun-linux-*; the versions are pinned by package-lock.json), unless BUN names a bun to use, or
# `--use-path` is given and a bun is on PATH. Idempotent. Prints the bun it will run.
set -euo pipefail
cd "$(dirname "$0")"
if [[ -n "${BUN:-}" ]]; then
  echo "bun $("$BUN" --version) ($BUN)"
  exit 0
fi
if [[ "${1:-}" == "--use-path" ]] && command -v bun >/dev/null 2>&1; then
  echo "bun $(bun --version) ($(command -v bun))"
  exit 0
fi
if ! node_modules/.bin/bun --version >/dev/null 2>&1; then
  if [[ -f package-lock.json ]]; then
    npm ci --no-audit --no-fund
  else
    npm install --no-audit --no-fund
  fi
fi
echo "bun $(node_modules/.bin/bun --version) ($(pwd)/node_modules/.bin/bun)"
