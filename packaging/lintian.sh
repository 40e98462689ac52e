#!/usr/bin/env bash
# lintian.sh DEB: Debian's package checker, pedantic. Fails on any error, and on any
# warning that packaging/debian/aipbx-appliance.lintian-overrides does not override;
# every override there must carry a comment saying why. Info and pedantic tags are shown.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:?usage: lintian.sh DEB}
overrides=packaging/debian/aipbx-appliance.lintian-overrides

# An override without a comment right above it (or above its group) is refused.
if [ -f "$overrides" ]; then
    awk '
        /^#/      { commented = 1; next }
        /^[ \t]*$/ { commented = 0; next }
        !commented { printf "lintian.sh: %s:%d: override without a comment saying why\n", FILENAME, NR; bad = 1 }
        END       { exit bad }
    ' "$overrides"
fi

lintian -I -E --pedantic --show-overrides --fail-on error,warning "$deb"
echo "lintian.sh: no errors, no unexplained warnings in $deb"
