#!/bin/bash
# Build the sample backend release VERSION: OUT_DIR/aipbx-sample-VERSION/ (a release
# directory) and, when the appliance's packer is in this tree, the artifact
# OUT_DIR/aipbx-sample-VERSION.tar.gz with its .sha256.
# Usage: sample_backend/build.sh OUT_DIR VERSION     (e.g. build/sample 1.0.0)
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 OUT_DIR VERSION" >&2
    exit 2
fi
version=$2
if ! [[ $version =~ ^[0-9][0-9A-Za-z.+~-]*$ ]]; then
    echo "$0: version '$version': [0-9A-Za-z.+~-], starting with a digit" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(dirname "$here")
python=${PYTHON:-/usr/bin/python3}
mkdir -p "$1"
out=$(cd "$1" && pwd)
release=$out/aipbx-sample-$version

# Assemble in a temp dir beside it, then rename: never a half-built release dir.
tmp=$(mktemp -d "$out/.aipbx-sample-$version.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/aipbx_sample"
install -m 0644 "$here"/aipbx_sample/*.py "$tmp/aipbx_sample/"
sed "s/@VERSION@/$version/" "$here/aipbx-release.toml.in" >"$tmp/aipbx-release.toml"
chmod 0755 "$tmp" "$tmp/aipbx_sample"
rm -rf "$release"
mv "$tmp" "$release"
trap - EXIT
echo "$release"

if [ -f "$top/appliance/release/pack.py" ]; then
    cd "$top"
    "$python" -c '
import sys
from pathlib import Path
from appliance.errors import AipbxError
from appliance.release.pack import pack
try:
    print(pack(Path(sys.argv[1]), Path(sys.argv[2])))
except AipbxError as e:
    sys.exit(f"pack: {e.message}")
' "$release" "$out"
fi
