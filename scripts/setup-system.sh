#!/usr/bin/env bash
# Install what iotgw needs from Debian's packages when it is missing: Mosquitto (broker and
# clients, for the tests, the demo and the benchmark) and python3-venv (for the virtualenv).
# With --test also what the tests drive: Chromium (the staff page, headless) and Prometheus
# with promtool (the dashboards' queries and rules).
set -euo pipefail

need=()
if [ "${1:-}" = "--test" ]; then
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)
fi
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

echo "setup: installing ${need[*]} from Debian's packages" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
