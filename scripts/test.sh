#!/usr/bin/env bash
# Install what the test lab needs, then lint, type-check and test dane-relay.
#
# Runs on a bare Debian 12 machine as root, non-interactively:
#   1. apt: nsd + unbound (the integration lab's DNS servers) and python3 + venv, only if
#      missing. The lab runs its own instances on 127.R.0.1/.2:53. A system nsd/unbound is
#      stopped only if this run installed it (apt starts it) or it listens on a wildcard
#      address on port 53, which would keep the lab from binding; a resolver on 127.0.0.1
#      (what the relay itself uses) is left running.
#   2. .venv (created with python3 >= 3.11 if missing), `pip install -e '.[test]'`.
#   3. ruff, mypy (strict, configured in pyproject.toml), import-linter, pytest.
# Arguments are passed to pytest, e.g. `scripts/test.sh tests/integration -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(nsd unbound python3 python3-venv prometheus postfix)
missing=()
for pkg in "${apt_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    echo "test.sh: installing ${missing[*]}" >&2
    if [[ " ${missing[*]} " == *" postfix "* ]]; then
        # bench/run (and its smoke test) runs private Postfix instances; the system one
        # must stay unconfigured: no /etc/postfix/main.cf, nothing started.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
wildcard53() {  # is some process listening on 0.0.0.0:53 or [::]:53 (or can we not tell)?
    command -v ss >/dev/null 2>&1 || return 0
    ss -Hlnu 2>/dev/null | awk '{print $4}' | grep -Eq '^(0\.0\.0\.0|\*|\[::\]):53$'
}
wildcard25() {  # is some process listening on 0.0.0.0:25 or [::]:25 (or can we not tell)?
    command -v ss >/dev/null 2>&1 || return 0
    ss -Hlnt 2>/dev/null | awk '{print $4}' | grep -Eq '^(0\.0\.0\.0|\*|\[::\]):25$'
}
# A system Postfix on *:25 would collide with the lab's receivers on 127.x.y.z:25.
if [[ " ${missing[*]} " == *" postfix "* ]] || wildcard25; then
    if postfix status >/dev/null 2>&1; then  # the default instance is running
        echo "test.sh: stopping the system postfix (it would hold port 25 the lab needs)" >&2
    fi
    service postfix stop >/dev/null 2>&1 || true
    if [[ " ${missing[*]} " == *" postfix "* ]]; then
        update-rc.d postfix disable >/dev/null 2>&1 || true
    fi
fi
for daemon in nsd unbound; do
    if [[ " ${missing[*]} " == *" $daemon "* ]] || wildcard53; then
        if service "$daemon" status >/dev/null 2>&1; then
            echo "test.sh: stopping the system $daemon (it would hold port 53 the lab needs)" >&2
        fi
        service "$daemon" stop >/dev/null 2>&1 || true
    fi
done

if [ ! -x .venv/bin/python ]; then
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
        echo "test.sh: python3 >= 3.11 is required, found $(python3 -V 2>&1)" >&2
        exit 1
    }
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[test]'

.venv/bin/ruff check relay tests bench
.venv/bin/ruff format --check relay tests bench
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/pytest "$@"
