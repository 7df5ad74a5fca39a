#!/bin/sh
# Run a command of this checkout inside Debian 13 (whose Dovecot is 2.4), in a chroot
# with that release's Dovecot, Postfix (with its LMDB module, as Alpine's Postfix has LMDB
# built in), OpenDKIM, NSD (DNS for arriving mail's DKIM keys), OpenSSL, the Python
# libraries our packages depend on, the tools that build them, and OpenRC (to run our
# Alpine init scripts, tests/openrc). Not a booted system (tests/system does that):
# for tests that start the daemons themselves, like tests/config and tests/openrc, and
# for building our packages for that release (make debs-trixie).
# The chroot is built once and cached outside the checkout, keyed by this script; each
# run gets a throw-away overlay on it, with the checkout mounted at /src.
# --dovecot-from SUITE: with that Debian suite's Dovecot instead (e.g. forky's 2.4.5, the
# release Alpine 3.23 ships), from a second cached layer on top of the chroot.
# --suite SUITE: another Debian release than 13 (bookworm: to build Debian 12's packages
# on a Debian 13 host).
# Usage: tests/chroot.sh [--suite SUITE] [--dovecot-from SUITE] COMMAND...
# (run from anywhere, as root)
set -eu
suite=trixie
dovecot_suite=
if [ "${1:-}" = "--suite" ]; then
	suite=${2:?--suite needs a suite}
	shift 2
fi
if [ "${1:-}" = "--dovecot-from" ]; then
	dovecot_suite=${2:?--dovecot-from needs a suite}
	shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [--suite SUITE] [--dovecot-from SUITE] COMMAND..." >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${CHATMAIL_TEST_CACHE:-/var/cache/chatmail-relay-test}
key=$(sha256sum <"$0" | cut -c1-16)
base=$cache/chroot-$suite-$key
packages="dovecot-core dovecot-imapd dovecot-lmtpd postfix openssl adduser procps \
python3 python3-pytest python3-jinja2 python3-aiosmtpd python3-dkim python3-dnspython \
python3-filelock python3-psutil python3-qrcode dovecot-auth-lua lua-socket lua-cjson \
debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools help2man \
po-debconf dpkg-dev fakeroot build-essential openrc iproute2 nginx fcgiwrap postfix-lmdb \
opendkim opendkim-tools nsd dovecot-dev"

# quietly LOG COMMAND...: run COMMAND with its output in LOG; on failure show LOG's end.
quietly() {
	log=$1
	shift
	"$@" >>"$log" 2>&1 || { tail -20 "$log" >&2; rm -f "$log"; exit 1; }
}

build_base() {
	mkdir -p "$cache"
	tmp=$(mktemp -d "$cache/.chroot-$suite.XXXXXX")
	trap 'umount "$tmp/proc" 2>/dev/null || true; rm -rf --one-file-system "$tmp"' EXIT
	echo "chroot.sh: building a $suite chroot with its Dovecot (cached as $base)" >&2
	quietly "$tmp.log" debootstrap --variant=minbase "$suite" "$tmp" http://deb.debian.org/debian
	# Nothing may start in the chroot: it shares the host's network.
	printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
	chmod 755 "$tmp/usr/sbin/policy-rc.d"
	mount -t proc proc "$tmp/proc"
	echo "postfix postfix/main_mailer_type select No configuration" |
		chroot "$tmp" debconf-set-selections
	# shellcheck disable=SC2086 # one package per word
	quietly "$tmp.log" chroot "$tmp" sh -c "apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$packages >/dev/null && apt-get clean"
	umount "$tmp/proc"
	rm -f "$tmp.log"
	mv "$tmp" "$base"
	trap - EXIT
	# Older chroots, and the layers made on them.
	for old in "$cache/chroot-$suite-"* "$cache/layer-$suite-"*; do
		case $old in "$base" | "$cache/layer-$suite-$key-"*) ;; *) rm -rf "$old" ;; esac
	done
}

# The layer with another suite's Dovecot: an overlay upper directory kept for reuse.
build_dovecot_layer() {
	tmp=$(mktemp -d "$cache/.layer.XXXXXX")
	trap 'umount "$tmp/root/proc" "$tmp/root" 2>/dev/null || true; rm -rf --one-file-system "$tmp"' EXIT
	echo "chroot.sh: adding $dovecot_suite's Dovecot (cached as $layer)" >&2
	mkdir -p "$tmp/upper" "$tmp/work" "$tmp/root"
	mount -t overlay overlay -o "lowerdir=$base,upperdir=$tmp/upper,workdir=$tmp/work" "$tmp/root"
	mount -t proc proc "$tmp/root/proc"
	echo "deb http://deb.debian.org/debian $dovecot_suite main" \
		>"$tmp/root/etc/apt/sources.list.d/$dovecot_suite.list"
	# A testing suite's Release file expires within days; the archive reachable here
	# may serve one past that date.
	quietly "$tmp.log" chroot "$tmp/root" sh -c "apt-get -o Acquire::Check-Valid-Until=false \
		update -qq && DEBIAN_FRONTEND=noninteractive apt-get \
		-o Acquire::Check-Valid-Until=false install -y -qq --no-install-recommends \
		-t $dovecot_suite dovecot-core dovecot-imapd dovecot-lmtpd dovecot-auth-lua dovecot-dev \
		>/dev/null && apt-get clean"
	umount "$tmp/root/proc" "$tmp/root"
	rm -f "$tmp.log"
	mv "$tmp/upper" "$layer"
	rm -rf --one-file-system "$tmp"
	trap - EXIT
}

[ -d "$base" ] || build_base
lower=$base
if [ -n "$dovecot_suite" ]; then
	layer=$cache/layer-$suite-$key-dovecot-$dovecot_suite
	[ -d "$layer" ] || build_dovecot_layer
	lower=$layer:$base
fi

run=$(mktemp -d /var/tmp/chatmail-chroot.XXXXXX)
root=$run/root
# Daemons a test left running (supervise-daemon respawns its service) would keep the
# overlay busy: end every process whose root is this chroot.
kill_leftovers() {
	for proc in /proc/[0-9]*; do
		[ "$(readlink "$proc/root" 2>/dev/null)" = "$root" ] && kill -9 "${proc#/proc/}" 2>/dev/null
	done
	return 0
}
cleanup() {
	kill_leftovers
	for mount in "$root/src" "$root/dev" "$root/proc" "$root/tmp" "$root"; do
		umount "$mount" 2>/dev/null || true
	done
	rm -rf --one-file-system "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$run/upper" "$run/work" "$root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$run/upper,workdir=$run/work" "$root"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
mkdir -p "$root/src"
mount --bind "$repo" "$root/src"
# The repository's address goes into packages built here, as in the host's builds.
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
	PYTHONDONTWRITEBYTECODE=1 CHATMAIL_REPO_URL="${CHATMAIL_REPO_URL:-}" \
	sh -c 'cd /src && exec "$@"' sh "$@"
