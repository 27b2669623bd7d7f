#!/bin/sh
# Makes `promtool` (Prometheus' rule checker, used by tests/test_deploy_prometheus.py) available.
# Idempotent: does nothing when promtool is on PATH. Installs Debian's `prometheus` package when running
# as root on a machine with apt-get; otherwise prints how to get it and exits 0, so `make install` never
# fails here (the tests then skip locally, and fail in CI where CI=true).
set -eu

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_promtool: installing Debian package 'prometheus' for promtool" >&2
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
        if command -v promtool >/dev/null 2>&1; then
            exit 0
        fi
    fi
    echo "ensure_promtool: WARNING: apt-get could not install promtool" >&2
    exit 0
fi

echo "ensure_promtool: WARNING: promtool not found and cannot install it (need root and apt-get);" \
    "install Prometheus' promtool (Debian/Ubuntu: apt-get install prometheus) to run the alert-rule tests" >&2
exit 0
