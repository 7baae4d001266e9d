#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` from the llama.cpp tree inside llama-cpp-python's source distribution, at the
# version this project locks (requirements/ci.txt), for `sirllm-agents bench serve --targets llama-server`.
#
#   bash benchmarks/build_llama_server.sh            # prints the binary's path; reuses it when already built
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 bash benchmarks/build_llama_server.sh
#   bash benchmarks/build_llama_server.sh --force    # rebuild even when the binary is there
#
# The binary goes to ${SIRLLM_AGENTS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/sirllm-agents}/llama-server/llama-server,
# beside a VERSION file naming the llama-cpp-python release it came from. Only PyPI is used (pip download of the
# sdist); the configure step turns off everything that would fetch over the network (the web UI's assets, curl,
# OpenSSL builds). Release, CPU only, static libraries, `-j2`, all under `nice -n 19`: about 10-20 minutes on 2 cores.
# Not run by CI or the tests.
set -euo pipefail

say() { echo "build_llama_server.sh: $*" >&2; }
fail() {
    say "FAILED: $*"
    exit 1
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help)
            sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) fail "unknown argument '$arg' (expected --force or --help)" ;;
    esac
done

version="${LLAMA_CPP_PYTHON_VERSION:-}"
if [[ -z "$version" ]]; then
    version="$(sed -n 's/^llama-cpp-python==\([0-9][0-9.]*\).*/\1/p' "$root/requirements/ci.txt" | head -n 1)"
fi
[[ -n "$version" ]] || fail "no llama-cpp-python version: none pinned in requirements/ci.txt and LLAMA_CPP_PYTHON_VERSION unset"

cache="${SIRLLM_AGENTS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sirllm-agents}/llama-server"
binary="$cache/llama-server"
if [[ "$force" == 0 && -x "$binary" && "$(cat "$cache/VERSION" 2>/dev/null)" == "$version" ]]; then
    if "$binary" --version >/dev/null 2>&1; then
        say "already built (llama-cpp-python $version)"
        echo "$binary"
        exit 0
    fi
    say "the cached binary does not run; building it again"
fi

for tool in cmake c++ cc; do
    command -v "$tool" >/dev/null || fail "'$tool' is not on the PATH (Debian: apt-get install cmake build-essential)"
done
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
"$python" -m pip --version >/dev/null 2>&1 || fail "'$python -m pip' does not run (set PYTHON to a Python with pip)"

mkdir -p "$cache"
log="$cache/build.log"
: >"$log"
work="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

step() {  # step NAME COMMAND...: runs it under nice, its output in the log; names the step and the log on failure
    local name="$1"
    shift
    say "$name..."
    echo "== $name: $*" >>"$log"
    if ! nice -n 19 "$@" >>"$log" 2>&1; then
        tail -n 25 "$log" >&2
        fail "$name (the full output: $log)"
    fi
}

step "downloading the llama-cpp-python $version source distribution from PyPI" \
    "$python" -m pip download --no-binary :all: --no-deps --dest "$work" \
    "llama-cpp-python==$version"
archive="$(find "$work" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | head -n 1)"
[[ -n "$archive" ]] || fail "pip download left no llama_cpp_python-*.tar.gz in $work (see $log)"
step "unpacking $(basename "$archive")" tar -xzf "$archive" -C "$work"
source_dir="$work/llama_cpp_python-$version/vendor/llama.cpp"
[[ -f "$source_dir/tools/server/CMakeLists.txt" ]] ||
    fail "the sdist has no llama.cpp server sources at vendor/llama.cpp/tools/server"

step "configuring llama.cpp (cmake, Release, CPU, no network fetches)" \
    cmake -S "$source_dir" -B "$work/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_BORINGSSL=OFF \
    -DLLAMA_BUILD_LIBRESSL=OFF \
    -DLLAMA_LLGUIDANCE=OFF \
    -DGGML_NATIVE=ON \
    -DFETCHCONTENT_FULLY_DISCONNECTED=ON
step "building the llama-server target (-j2; this takes a while on 2 cores)" \
    cmake --build "$work/build" --config Release --target llama-server -j 2

built="$(find "$work/build" -type f -name llama-server -perm -u+x | head -n 1)"
[[ -n "$built" ]] || fail "the build finished but produced no llama-server binary (see $log)"
"$built" --version >>"$log" 2>&1 || fail "the built llama-server does not run: '$built --version' failed (see $log)"
install -m 0755 "$built" "$binary.tmp"
mv -f "$binary.tmp" "$binary"
echo "$version" >"$cache/VERSION"
say "built from llama-cpp-python $version"
echo "$binary"
