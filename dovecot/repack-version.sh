#!/bin/sh
# Copy dovecot .debs under another version, without rebuilding: the system tests'
# stand-ins for the previous release's rebuild of Debian's Dovecot (+chatmail1~previous),
# for Debian's next security update (+security1) and for the Dovecot 2.3.21 build that
# upstream's cmdeploy installs (a whole version, and -a abiv21). The packages'
# exact-version relations to each other follow.
# Usage: dovecot/repack-version.sh [-a ABI] VERSION OUTDIR DEB...
#   VERSION: +SUFFIX or ~SUFFIX is appended to each .deb's version; anything else
#   replaces it. -a ABI: dovecot-core then provides dovecot-abi-2.3.ABI (what plugins
#   built for that Dovecot depend on) instead of its build's ABI.
set -eu
abi=
while getopts a: option; do
	case $option in
	a) abi=$OPTARG ;;
	*) exit 2 ;;
	esac
done
shift $((OPTIND - 1))
new=$1 outdir=$2
shift 2
mkdir -p "$outdir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for deb in "$@"; do
	version=$(dpkg-deb -f "$deb" Version)
	case $new in
	[+~]*) target=$version$new ;;
	*) target=$new ;;
	esac
	rm -rf "$work/tree"
	dpkg-deb -R "$deb" "$work/tree"
	sed -i -e "s/^Version: .*/Version: $target/" \
		-e "/^\(Pre-\)\?Depends:\|^Breaks:\|^Recommends:/s/(= $version)/(= $target)/g" \
		"$work/tree/DEBIAN/control"
	if [ -n "$abi" ]; then
		sed -i "/^Provides:/s/dovecot-abi-2\.3\.abiv[0-9]*/dovecot-abi-2.3.$abi/" \
			"$work/tree/DEBIAN/control"
	fi
	dpkg-deb -b -Zxz "$work/tree" "$outdir/" >/dev/null
done
