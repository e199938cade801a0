#!/usr/bin/env bash
# Make sure the PostgreSQL and RabbitMQ the tests use are reachable; start local ones that are
# installed but stopped. Skipped for a service whose ACCESSFLOW_TEST_* URL points elsewhere.
set -euo pipefail

wait_for() {  # wait_for NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then echo "$name: up"; return 0; fi
    sleep 1
  done
  echo "$name: not reachable after ${seconds}s" >&2
  return 1
}

if [ -z "${ACCESSFLOW_TEST_DATABASE_URL:-}" ] && command -v pg_isready >/dev/null; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if [ -d /etc/postgresql ]; then
      echo "postgresql: starting the local cluster"
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    fi
    wait_for postgresql 60 pg_isready -q -h 127.0.0.1 -p 5432
  fi
fi

if [ -z "${ACCESSFLOW_TEST_BROKER_URL:-}" ] && command -v rabbitmq-server >/dev/null; then
  if ! rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; then
    echo "rabbitmq: starting the local node"
    rabbitmq-server -detached || true
    wait_for rabbitmq 120 rabbitmq-diagnostics -q check_port_connectivity
  fi
fi

# The console's browser test drives the system's headless Chromium (Playwright, no browser download).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "chromium: installing the Debian package"
  (apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
    || echo "chromium: could not install it; the console's browser test will be skipped" >&2
fi
