#!/usr/bin/env bash
# The outside services the serve tests use, on a Debian machine as root (CI): a PostgreSQL server on
# loopback and headless Chromium with its WebDriver.
#
# Installs what is missing from Debian's packages, starts PostgreSQL (through pg_ctlcluster, which runs the
# server as the `postgres` user: PostgreSQL refuses to run as root), makes a role and a database for the
# tests, and prints one line on stdout: the database's URL. Everything else goes to stderr. Use it as
#
#     COGVIDEOX_TEST_PG_URL="$(bash scripts/ci-services.sh)"
#     export COGVIDEOX_TEST_PG_URL
#
# Running it again is harmless: installed packages, a running server, the role and the database are kept.
set -euo pipefail

DB_USER=cogvideox
DB_PASSWORD=cogvideox
DB_NAME=cogvideox_test

log() { echo "ci-services: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "run me as root (I install Debian packages and start PostgreSQL as the postgres user)"
    exit 1
fi

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# The package creates a cluster named main on install; make one if this machine has none.
read -r version cluster port status _ < <(pg_lsclusters --no-header | head -n 1) || true
if [ -z "${version:-}" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    log "creating PostgreSQL $version cluster main"
    pg_createcluster "$version" main >&2
    read -r version cluster port status _ < <(pg_lsclusters --no-header | head -n 1)
fi
if [ "$status" != "online" ]; then
    log "starting PostgreSQL $version/$cluster on port $port"
    pg_ctlcluster "$version" "$cluster" start >&2
fi
for _ in $(seq 50); do
    pg_isready -q -h 127.0.0.1 -p "$port" && break
    sleep 0.2
done
pg_isready -q -h 127.0.0.1 -p "$port" || { log "PostgreSQL did not come up on port $port"; exit 1; }

as_postgres() { (cd / && su postgres -c "$1"); }
if [ -z "$(as_postgres "psql -p $port -tAc \"SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'\"")" ]; then
    as_postgres "psql -p $port -q -c \"CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD'\"" >&2
fi
if [ -z "$(as_postgres "psql -p $port -tAc \"SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'\"")" ]; then
    as_postgres "createdb -p $port -O $DB_USER $DB_NAME" >&2
fi
log "PostgreSQL ready; chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}')"
echo "postgresql://$DB_USER:$DB_PASSWORD@127.0.0.1:$port/$DB_NAME"
