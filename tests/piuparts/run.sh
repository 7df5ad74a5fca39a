#!/bin/sh
# piuparts, Debian's installation checker, on our packages from dist/repo: each installed
# from the repository into a minimal Debian of SUITE and purged again, leaving nothing
# behind (--warn-on-others: what their dependencies leave is theirs). (No piuparts
# upgrade test: the previous release fails in a chroot, where its postinst could not
# start services; tests/system/test_upgrade.py upgrades it under systemd instead.)
# The minimal Debian is made by debootstrap once per suite, cached outside the checkout.
# Needs the network (Debian's archive), as `make deps` does.
# Usage: tests/piuparts/run.sh SUITE
set -eu
suite=$1
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)/dist/repo
pool=$repo/pool/$suite/main
cache=${CHATMAIL_TEST_CACHE:-/var/cache/chatmail-relay-test}/piuparts
mirror=http://deb.debian.org/debian
base=$cache/base-$suite.tgz
logs=$(mktemp -d "${TMPDIR:-/tmp}/piuparts-$suite.XXXXXX")
mkdir -p "$cache"
# debconf's own scratch directory (dpkg-preconfigure's extracted control files), which
# Debian 13's debconf leaves behind for any package apt installs
ignore=--ignore=/var/cache/debconf/tmp.ci/

if [ ! -f "$base" ]; then
	echo "piuparts: making a minimal Debian $suite (cached as $base)" >&2
	# a first run saves its chroot; the package it checks is ours, and the smallest
	piuparts -d "$suite" -m "$mirror" "$ignore" --no-upgrade-test -s "$base.tmp" \
		"$pool"/chatmail-archive-keyring_*.deb >"$logs/base.log" 2>&1 ||
		{ tail -30 "$logs/base.log" >&2; exit 1; }
	mv "$base.tmp" "$base"
fi

# check NAME ARGS...: one piuparts run; what failed, and where the whole log is.
check() {
	log=$logs/$1.log
	shift
	if piuparts -b "$base" -d "$suite" -m "$mirror" "$ignore" --warn-on-others \
		--scriptsdir "$here/scripts" "$@" >"$log" 2>&1; then
		echo "piuparts $suite: $(basename "$log" .log): PASS"
	else
		grep -E "ERROR|FAIL" "$log" | tail -20 >&2
		grep -A30 "left files on system" "$log" | head -40 >&2 || true
		echo "piuparts $suite: $(basename "$log" .log): FAILED (whole log: $log)" >&2
		return 1
	fi
}

failed=0
for package in python3-chatmaild chatmail-archive-keyring dovecot-chatmail-instant-idle \
	chatmail-relay; do
	check "$package" --no-upgrade-test --bindmount "$repo" \
		"--extra-repo=deb [trusted=yes] file://$repo $suite main" --apt "$package" ||
		failed=1
done
[ "$failed" = 0 ] && rm -rf "$logs"
exit $failed
