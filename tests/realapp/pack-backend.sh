#!/bin/bash
# Pack the built real aiPBX backend (tests/realapp/build-backend.sh) into two releases, as
# its operators would with `aipbxctl release pack`, and print the artifacts' directory:
#   OUT_DIR/aipbx-<V1>.tar.gz   the built tree as it is
#   OUT_DIR/aipbx-<V2>.tar.gz   the same tree (hard links, nothing copied) except
#                               public/widget/dist/widget.js, which a new version ships
#                               changed (a comment appended), so a test can tell the
#                               release a route served
# OUT_DIR/app.json names the backend and its commit. Packing is skipped when the tree and
# the packer are the ones the artifacts were made from.
#
# Usage: tests/realapp/pack-backend.sh APP_DIR OUT_DIR
set -euo pipefail

V1=2.5.4.1
V2=2.5.4.2
if [ $# -ne 2 ]; then
    echo "usage: $0 APP_DIR OUT_DIR" >&2
    exit 2
fi
app=$(realpath "$1")
mkdir -p "$2"
out=$(realpath "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
python=${PYTHON:-/usr/bin/python3}

key=$( { echo "$app"; sha256sum "${BASH_SOURCE[0]}" "$top"/appliance/release/*.py \
         "$top"/appliance/cli.py; } | sha256sum | cut -c1-16)
if [ "$(cat "$out/.key" 2>/dev/null)" = "$key" ] \
   && [ -f "$out/aipbx-$V1.tar.gz.sha256" ] && [ -f "$out/aipbx-$V2.tar.gz.sha256" ]; then
    echo "$out"
    exit 0
fi
rm -f "$out"/aipbx-*.tar.gz* "$out/.key"

pack() {  # pack DIR VERSION
    (cd "$top" && "$python" -m appliance release pack "$1" -o "$out" \
        --name aipbx --version "$2" --command "node dist/main.js" --runtime runtime/bin \
        --shared-dir static --shared-dir tts_voices \
        --sql-migrations migrations/postgres \
        --require-env OPENAI_API_KEY --require-env STRIPE_SECRET_KEY \
        --generate-env PRIVATE_KEY --generate-env JWT_SECRET \
        --generate-env HELPDESK_ENCRYPTION_KEY --generate-env ENCRYPTION_KEY) >&2
}
start=$(date +%s)
pack "$app" "$V1"
v2=$(mktemp -d "$out/.v2.XXXXXX")
trap 'rm -rf "$v2"' EXIT
cp -al "$app" "$v2/app"
widget=$v2/app/public/widget/dist/widget.js
rm "$widget"
{ cat "$app/public/widget/dist/widget.js"; printf '\n/* aipbx test release %s */\n' "$V2"; } >"$widget"
chmod 0644 "$widget"
pack "$v2/app" "$V2"
"$python" -c 'import json,sys; d=json.load(open(sys.argv[1])); d.update(v1=sys.argv[2], v2=sys.argv[3]); print(json.dumps(d))' \
    "$(dirname "$app")/source.json" "$V1" "$V2" >"$out/app.json"
echo "$key" >"$out/.key"
echo "pack-backend: packed $V1 and $V2 in $(( $(date +%s) - start )) s" >&2
echo "$out"
