# headspace-watcher — everyday commands. Every recipe sets up what is missing first.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv + "/bin"

# list the recipes
default:
    @just --list

# create .venv with the project and its dev deps (again only when pyproject.toml changed)
venv:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp="{{venv}}/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        [ -x "{{bin}}/python" ] || python3 -m venv "{{venv}}"
        "{{bin}}/pip" install --quiet --disable-pip-version-check -e '.[dev]'
        rm -f "{{venv}}"/.installed-*
        touch "$stamp"
    fi

# venv + the embedded PostgreSQL's data dir + the schema (idempotent)
setup: venv
    @# the service loads bytecode even where PYTHONDONTWRITEBYTECODE is set (an editable
    @# install compiles nothing): compiling at every start costs ~0.3 s and ~2.5 MB of RSS
    {{bin}}/python -m compileall -q headspace_watcher >/dev/null
    {{bin}}/headspace-watcher setup

# the whole test suite (starts its own throwaway PostgreSQL)
test *ARGS: venv
    {{bin}}/python -m pytest {{ARGS}}

# fault-injection suite with the long settings
chaos *ARGS: venv
    HEADSPACE_CHAOS=long {{bin}}/python -m pytest -m chaos tests/chaos {{ARGS}}

# set up, then run circusd in the foreground: embedded PostgreSQL + the watcher (Ctrl-C stops it)
run: setup
    #!/usr/bin/env bash
    set -euo pipefail
    # circus.ini puts sockets, pid file and logs in the state dir of the configuration
    HEADSPACE_STATE_DIR="$({{bin}}/python -m headspace_watcher.circus_hooks state-dir)"
    export HEADSPACE_STATE_DIR
    echo "headspace-watcher: state dir $HEADSPACE_STATE_DIR (logs in $HEADSPACE_STATE_DIR/log)"
    # circusd as the terminal's foreground job: Ctrl-C reaches it alone, exit 0 when clean
    exec {{bin}}/python -m headspace_watcher.circus_hooks circusd circus.ini

# run the benchmarks in bench/ and print their figures
bench *ARGS: venv
    {{bin}}/python -m bench {{ARGS}}

# circusctl status plus headspace-watcher status (exit: 0 healthy, 1 degraded, 3 not running)
[no-exit-message]
status: venv
    #!/usr/bin/env bash
    set -uo pipefail
    report="$({{bin}}/headspace-watcher status --json)"
    code=$?
    state_dir="$(printf '%s' "$report" | {{bin}}/python -c \
        'import json, sys; print(json.load(sys.stdin).get("state_dir", ""))' 2>/dev/null)"
    socket="${state_dir:-${HEADSPACE_STATE_DIR:-var}}/circus/endpoint"
    if [ -S "$socket" ]; then
        {{bin}}/circusctl --endpoint "ipc://$socket" --timeout 3 status \
            || echo "circus: not answering on $socket"
    else
        echo "circus: not running (no control socket $socket)"
    fi
    printf '%s' "$report" | {{bin}}/python -c \
        'import json, sys; from headspace_watcher.service.health import render; print(render(json.load(sys.stdin)))' \
        2>/dev/null || printf '%s\n' "$report"
    exit $code

# ruff lint + format check
lint: venv
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
