#!/bin/sh
# Copy dovecot .debs under their version plus SUFFIX, without rebuilding: the system
# tests' stand-ins for the previous release's rebuild of Debian's Dovecot
# (+chatmail1~previous) and for Debian's next security update (+security1). The
# packages' exact-version relations to each other follow.
# Usage: dovecot/repack-version.sh SUFFIX OUTDIR DEB...
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
