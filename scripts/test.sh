#!/usr/bin/env bash
# Set up this machine for the tests and run them; arguments go to pytest.
#
# Creates .venv if it is missing, installs the project with its test extra,
# makes sure PostgreSQL accepts connections on 127.0.0.1:5432 (starting the
# local cluster if not), then runs pytest. The exit code is pytest's, and
# "no tests collected" (pytest's code 5) counts as a failure too.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

POSTGRES_HOST=127.0.0.1
POSTGRES_PORT=5432
POSTGRES_WAIT_S=30

log() {
    echo "test.sh: $*" >&2
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        python3 -m venv .venv
    fi
    if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        log "raysource needs Python 3.11 or newer, but .venv has" \
            "$(.venv/bin/python --version); remove .venv and rerun with a newer python3"
        exit 1
    fi

    # Reinstall only when the inputs of the editable install change: the
    # project metadata, or which top-level packages exist, because the
    # editable finder maps only the packages present at install time.
    local stamp_file=.venv/raysource-install.stamp
    local stamp
    stamp="$(
        {
            cat pyproject.toml
            ls -d aggregates/__init__.py store/__init__.py \
                pipeline/__init__.py 2>/dev/null || true
        } | sha256sum
    )"
    if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
        log "installing raysource with its test extra into .venv"
        .venv/bin/python -m pip install --quiet -e ".[test]"
        echo "$stamp" >"$stamp_file"
    fi
}

postgres_is_ready() {
    .venv/bin/python - "$POSTGRES_HOST" "$POSTGRES_PORT" <<'PYTHON'
import sys

import psycopg

host, port = sys.argv[1], sys.argv[2]
try:
    psycopg.connect(
        host=host, port=port, user="postgres", dbname="postgres", connect_timeout=3
    ).close()
except psycopg.OperationalError:
    sys.exit(1)
PYTHON
}

ensure_postgres() {
    if postgres_is_ready; then
        return
    fi

    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$version" ]; then
        log "PostgreSQL is not reachable on $POSTGRES_HOST:$POSTGRES_PORT and no" \
            "cluster is configured under /etc/postgresql; install PostgreSQL" \
            "(Debian: apt-get install postgresql) with trust auth for user postgres"
        exit 1
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true

    local waited_s=0
    until postgres_is_ready; do
        if [ "$waited_s" -ge "$POSTGRES_WAIT_S" ]; then
            log "PostgreSQL did not accept connections on" \
                "$POSTGRES_HOST:$POSTGRES_PORT within ${POSTGRES_WAIT_S} s;" \
                "see /var/log/postgresql/postgresql-$version-main.log"
            exit 1
        fi
        sleep 1
        waited_s=$((waited_s + 1))
    done
}

ensure_tmux() {
    # The terminal test of `raysource top` drives it in tmux.
    if command -v tmux >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing tmux for the terminal test of raysource top"
        apt-get update -qq >/dev/null && apt-get install -y -qq tmux >/dev/null
    else
        log "tmux is missing and cannot be installed here; install it" \
            "(Debian: apt-get install tmux) for the terminal test of raysource top"
    fi
}

ensure_venv
ensure_postgres
ensure_tmux

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    log "pytest collected no tests; treating that as a failure"
fi
exit "$status"
