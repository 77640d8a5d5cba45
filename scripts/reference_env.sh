# Sourced by setup_reference.sh and setup_reference_next.sh after they set NAME (the script's
# name), VENV and PY and define check() (whether VENV already runs their reference): exits 0
# at once when it does; otherwise creates VENV and defines run() (a command, its output shown
# only on failure, then exit 1) and PIP (VENV's pip, quiet).

if [ -x "$VENV/bin/python" ] && check; then
    exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
run() {
    if ! "$@" >"$log" 2>&1; then
        echo "$NAME: FAILED: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

run "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
