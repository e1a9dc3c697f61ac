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
    {{bin}}/headspace-watcher setup

# the whole test suite (starts its own throwaway PostgreSQL)
test *ARGS: venv
    {{bin}}/python -m pytest {{ARGS}}

# fault-injection suite with the long settings
chaos *ARGS: venv
    HEADSPACE_CHAOS=long {{bin}}/python -m pytest -m chaos tests/chaos {{ARGS}}

# set up, then run circusd in the foreground: embedded PostgreSQL + the watcher
run: setup
    {{bin}}/circusd circus.ini

# run the benchmarks in bench/ and print their figures
bench *ARGS: venv
    {{bin}}/python -m bench {{ARGS}}

# circusctl status plus headspace-watcher status
status: venv
    -{{bin}}/circusctl --endpoint "ipc://$PWD/var/circus/endpoint" status
    {{bin}}/headspace-watcher status

# ruff lint + format check
lint: venv
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
