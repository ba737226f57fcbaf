#!/usr/bin/env bash
# Install what iotgw needs from Debian's packages when it is missing: Mosquitto (broker and
# clients, for the tests, the demo and the benchmark) and python3-venv (for the virtualenv).
# With --test also what the tests drive: Chromium (the staff page, headless), Prometheus with
# promtool (the dashboards' queries and rules), Alertmanager (the peer of the alertmanager
# receiver) and PostgreSQL (the suite runs on it as well as on SQLite: the server is started
# when it is not running, with a role `iotgw` and a database `iotgw_test` for the tests).
set -euo pipefail

need=()
if [ "${1:-}" = "--test" ]; then
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)
    command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
    command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
fi
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]} from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if [ "${1:-}" = "--test" ]; then
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        version=$(ls /etc/postgresql | sort -n | tail -1)
        echo "setup: starting PostgreSQL $version" >&2
        $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start
        for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
    as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
    as_postgres psql -q -v ON_ERROR_STOP=1 -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'iotgw') THEN
            CREATE ROLE iotgw LOGIN PASSWORD 'iotgw';
        END IF; END \$\$;" >/dev/null
    if [ "$(as_postgres psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'iotgw_test'")" != "1" ]; then
        as_postgres createdb -O iotgw iotgw_test
    fi
fi
