#!/bin/sh
# Copy built dovecot .debs under a lower version, without rebuilding: the system tests
# need an older "patched dovecot" to upgrade from, and a second 20-minute build for it
# would test nothing more. The packages' exact-version relations to each other follow.
# Usage: dovecot/repack-version.sh SUFFIX OUTDIR DEB...   (SUFFIX like ~previous)
set -eu
suffix=$1 outdir=$2
shift 2
mkdir -p "$outdir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for deb in "$@"; do
	version=$(dpkg-deb -f "$deb" Version)
	rm -rf "$work/tree"
	dpkg-deb -R "$deb" "$work/tree"
	sed -i -e "s/^Version: .*/Version: $version$suffix/" \
		-e "/^\(Pre-\)\?Depends:\|^Breaks:\|^Recommends:/s/(= $version)/(= $version$suffix)/g" \
		"$work/tree/DEBIAN/control"
	dpkg-deb -b -Zxz "$work/tree" "$outdir/" >/dev/null
done
