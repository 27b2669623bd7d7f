#!/bin/sh
# Makes sure pgbench is on this machine for `make bench` (the metering benchmark's database ceiling).
# Idempotent: does nothing when a pgbench is found; otherwise installs Debian's PostgreSQL 15 client tools
# (pgbench lives in postgresql-client-15 on Debian 12; older releases ship it in postgresql-contrib).
set -eu

if [ -n "${BENCH_PGBENCH:-}" ] && [ -x "${BENCH_PGBENCH}" ]; then
    exit 0
fi
if [ -x /usr/lib/postgresql/15/bin/pgbench ] || command -v pgbench >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_pgbench: pgbench not found and no apt-get here; install PostgreSQL's pgbench" \
         "or set BENCH_PGBENCH (the bench falls back to the one pgserver bundles)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq postgresql-client-15 >/dev/null \
    || $SUDO apt-get install -y -qq postgresql-contrib >/dev/null
if [ -x /usr/lib/postgresql/15/bin/pgbench ] || command -v pgbench >/dev/null 2>&1; then
    echo "ensure_pgbench: pgbench installed"
else
    echo "ensure_pgbench: could not install pgbench; the bench falls back to the one pgserver bundles" >&2
fi
