#!/usr/bin/env bash
# piuparts.sh DEB: piuparts installs DEB into a clean Debian 12 chroot and purges it (no
# file may be left, no process may keep running), installs it again, removes it, installs
# it once more over the config files left by the removal, reinstalls it, and purges it
# (checked again). The base tarball, a minbase Debian 12 with systemd, is made once and
# cached in build/cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "${1:?usage: piuparts.sh DEB}")
suite=bookworm
cache=build/cache/piuparts-$suite-systemd.tar.gz

# The host's own Debian mirror, read now (never written into the repository).
mirror=$(awk -v suite="$suite" '
    /^[ \t]*$/ { if (uris != "" && ok) { print uris; exit } uris = ""; ok = 0; next }
    tolower($1) == "uris:"   { uris = $2 }
    tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
    END { if (uris != "" && ok) print uris }
' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
if [ -z "$mirror" ]; then
    mirror=$(awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' \
        /etc/apt/sources.list 2>/dev/null || true)
fi
if [ -z "$mirror" ]; then
    echo "piuparts.sh: found no $suite mirror in the host's apt sources" >&2
    exit 1
fi

# piuparts makes device nodes in its chroots: its temp dir must not be on a nodev or
# nosuid mount (/tmp often is).
mkdir -p build/cache build/tmp
if findmnt -n -o OPTIONS -T build/tmp | tr , '\n' | grep -qxE 'nodev|nosuid'; then
    echo "piuparts.sh: build/tmp is on a nodev or nosuid mount; piuparts cannot work there" >&2
    exit 1
fi

if [ ! -s "$cache" ]; then
    # A minbase chroot fails piuparts on files systemd leaves when it is pulled in as a
    # dependency: start from one that has systemd already.
    root=$(mktemp -d build/tmp/base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$suite" "$root" "$mirror"
    tar -C "$root" -czf "$cache.new" .
    mv "$cache.new" "$cache"
    rm -rf "$root"
    trap - EXIT
fi

tmp=$(realpath build/tmp)
# No upgrade test: the package is not in the archive. Ignored: nginx's own temporary
# directories, which `nginx -t` makes when the postinst tests the site (nginx would make
# them at its first start if piuparts let it start); nginx's purge removes them.
piuparts --distribution="$suite" --mirror="$mirror main" --basetgz="$cache" --tmpdir="$tmp" \
    --no-upgrade-test --install-purge-install --install-remove-install \
    --ignore-regexp='^/var/lib/nginx/(body|fastcgi|proxy|scgi|uwsgi)/$' "$deb"
echo "piuparts.sh: install, purge, install, remove, install, purge passed for $deb"
