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

# One run shows everything, overrides and their reasons included; the verdict is read
# from its output (lintian counts shown overrides as warnings in its exit status).
if ! out=$(lintian -I -E --pedantic --show-overrides --fail-on none "$deb" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "lintian.sh: lintian itself failed on $deb" >&2
    exit 1
fi
out=$(grep -v '^running with root privileges is not recommended!$' <<<"$out" || true)
printf '%s\n' "$out"
if grep -qE '^[EW]: ' <<<"$out"; then
    echo "lintian.sh: $deb has errors or warnings without a documented override" >&2
    exit 1
fi
echo "lintian.sh: no errors, no unexplained warnings in $deb"
