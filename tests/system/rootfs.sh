#!/bin/sh
# Build (once) a Debian root file system for the system tests: minbase with systemd and
# every package chatmail-relay depends on or recommends (apt installs Recommends by
# default, so admins get coturn and certbot), so tests can install from our repository
# offline. Dovecot itself is removed again (its libraries stay): a fresh server has none,
# and it comes from our repository, as on a fresh server.
# Cached outside the checkout, keyed by this script and debian/control.
# Usage: tests/system/rootfs.sh SUITE  -> prints the rootfs path
set -eu
suite=${1:-bookworm}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${CHATMAIL_TEST_CACHE:-/var/cache/chatmail-relay-test}
key=$(cat "$0" "$repo/debian/control" | sha256sum | cut -c1-16)
rootfs=$cache/rootfs-$suite-$key
if [ -d "$rootfs" ]; then
	echo "$rootfs"
	exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build-$suite.XXXXXX")
trap 'umount "$tmp/proc" 2>/dev/null || true; rm -rf "$tmp"' EXIT
echo "system tests: building a $suite root file system (cached as $rootfs)" >&2
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,ca-certificates \
	"$suite" "$tmp" http://deb.debian.org/debian >"$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; exit 1; }
# Nothing may start in the chroot: it shares the host's network.
printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
chmod 755 "$tmp/usr/sbin/policy-rc.d"
# The Depends of our packages (not our own, which come from our repository), and what the
# tests use inside the container. Those our rules add for Dovecot 2.4
# (${chatmail:Dovecot-Depends}) are listed below; Dovecot's own packages are removed again.
deps=$(awk '
	/^Package:/ { ours = ($2 == "chatmail-relay" || $2 == "python3-chatmaild") }
	/^[A-Za-z-]+:/ { field = $1 }
	ours && (field == "Depends:" || field == "Recommends:") { sub(/^[A-Za-z-]+:/, ""); print }
' "$repo/debian/control" | tr ',' '\n' |
	sed -n 's/^[[:space:]]*\([a-z0-9][a-z0-9.+-]*\).*/\1/p' | grep -vx -e python3-chatmaild -e chatmail-archive-keyring \
		-e dovecot-chatmail-instant-idle | sort -u | tr '\n' ' ')
# What the previous release (test_upgrade installs it offline) depended on and this one
# no longer does.
previous_deps="python3-filelock python3-psutil"
mount -t proc proc "$tmp/proc"
echo "postfix postfix/main_mailer_type select No configuration" | chroot "$tmp" debconf-set-selections
# shellcheck disable=SC2086 # one package per word
chroot "$tmp" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	--no-install-recommends $deps $previous_deps lua-socket lua-cjson debconf-utils procps python3 curl \
	unattended-upgrades >/dev/null \
	&& apt-mark manual \$(dpkg-query -W -f '\${Package} ') >/dev/null \
	&& apt-get purge -y -qq dovecot-core dovecot-imapd dovecot-lmtpd >/dev/null && apt-get clean"
umount "$tmp/proc"
rm -f "$tmp/usr/sbin/policy-rc.d" "$tmp/etc/hostname"
rm -f "$tmp.log"
mv "$tmp" "$rootfs"
trap - EXIT
# Older root file systems of this suite are stale now. One may be the lower layer of a
# running container, or another checkout on this machine may still boot from it (its
# rootfs.sh would build it again, and remove this one): those stay for a day.
for old in "$cache/rootfs-$suite-"*; do
	if [ "$old" != "$rootfs" ] && ! grep -q "lowerdir=${old}[,:]" /proc/mounts \
		&& [ -n "$(find "$old" -maxdepth 0 -mmin +1440)" ]; then
		rm -rf "$old"
	fi
done
echo "$rootfs"
