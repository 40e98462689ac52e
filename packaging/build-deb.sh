#!/usr/bin/env bash
# build-deb.sh: build build/aipbx-appliance_<version>_all.deb from the tracked source.
# The files git tracks (as they are in the working tree) are copied into a clean
# build/src/aipbx-appliance-<version>/, packaging/debian becomes debian/, and
# dpkg-buildpackage builds the binary package there. Run by `make deb`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's tools and Debian's Python only: a python3 from pyenv, a venv or /usr/local
# must not build the package.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

name=aipbx-appliance
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
if [ -z "$version" ]; then
    echo "build-deb: no version in pyproject.toml" >&2
    exit 1
fi
changelog_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$changelog_version" != "$version" ]; then
    echo "build-deb: pyproject.toml says $version but packaging/debian/changelog says" \
        "$changelog_version; add a changelog entry (dch -v $version)" >&2
    exit 1
fi

src=build/src/$name-$version
rm -rf build/src
mkdir -p "$src"

# Tracked files only, never whatever else lies around; a tracked file deleted in the
# working tree is left out.
files=()
while IFS= read -r -d '' f; do
    [ -e "$f" ] && files+=("$f")
done < <(git ls-files -z -- appliance bin units nginx man packaging pyproject.toml README.md)
cp -a --parents -t "$src" "${files[@]}"
mv "$src/packaging/debian" "$src/debian"

(cd "$src" && dpkg-buildpackage -us -uc -b)

deb=${name}_${version}_all.deb
mv -f "build/src/$deb" "build/$deb"
echo "build-deb: built build/$deb"
