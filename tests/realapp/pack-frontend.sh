#!/bin/bash
# Pack the two builds of the real aiPBX frontend (tests/realapp/build-frontend.sh) into
# frontend releases, as its operators would with `aipbxctl release pack --kind frontend`,
# and print the artifacts' directory:
#   OUT_DIR/aipbx-frontend-<V1>.tar.gz   release N (webpack's build/ as it is)
#   OUT_DIR/aipbx-frontend-<V2>.tar.gz   release N+1 (one lazily loaded chunk changed)
# OUT_DIR/frontend.json names the app, its commit, v1 and v2, and what differs between them
# (build-frontend.sh's source.json). Packing is skipped when the builds and the packer are
# the ones the artifacts were made from.
#
# Usage: tests/realapp/pack-frontend.sh BUILD_DIR OUT_DIR
set -euo pipefail

NAME=aipbx-frontend
if [ $# -ne 2 ]; then
    echo "usage: $0 BUILD_DIR OUT_DIR" >&2
    exit 2
fi
builds=$(realpath "$1")
mkdir -p "$2"
out=$(realpath "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
python=${PYTHON:-/usr/bin/python3}
# the app's version, then .1 (N) and .2 (N+1), as tests/realapp/pack-backend.sh does
version=$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
          "$builds/source.json")
V1=$version.1
V2=$version.2

key=$( { echo "$builds"; sha256sum "${BASH_SOURCE[0]}" "$top"/appliance/release/*.py \
         "$top"/appliance/cli.py; } | sha256sum | cut -c1-16)
if [ "$(cat "$out/.key" 2>/dev/null)" = "$key" ] \
   && [ -f "$out/$NAME-$V1.tar.gz.sha256" ] && [ -f "$out/$NAME-$V2.tar.gz.sha256" ]; then
    echo "$out"
    exit 0
fi
rm -f "$out/$NAME"-*.tar.gz* "$out/.key" "$out/frontend.json"

start=$(date +%s)
for pair in "n:$V1" "n1:$V2"; do
    (cd "$top" && "$python" -m appliance release pack "$builds/${pair%%:*}" -o "$out" \
        --name "$NAME" --version "${pair#*:}" --kind frontend) >&2
done
"$python" -c 'import json,sys; d=json.load(open(sys.argv[1])); d.update(name=sys.argv[2], v1=sys.argv[3], v2=sys.argv[4]); print(json.dumps(d))' \
    "$builds/source.json" "$NAME" "$V1" "$V2" >"$out/frontend.json"
echo "$key" >"$out/.key"
echo "pack-frontend: packed $V1 and $V2 in $(( $(date +%s) - start )) s" >&2
echo "$out"
