#!/bin/sh
# Build Debian's current dovecot source for this machine's Debian release with our one
# patch (instant-idle.patch), versioned <Debian version>+chatmail<N>.
# Usage: dovecot/build-deb.sh OUTDIR
# The .debs are cached outside the checkout, keyed by the source version and by this
# script and the patch, so an unchanged build is a copy. Needs root (build-dep).
set -eu
outdir=$1
here=$(cd "$(dirname "$0")" && pwd)
patch=$here/instant-idle.patch
# Raise it when the patch or the packaging changes for the same Debian version.
revision=1
cache=${CHATMAIL_BUILD_CACHE:-/var/cache/chatmail-relay-build}
# shellcheck disable=SC1091 # the host's
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
apt_dir=$cache/apt-src-$suite

say() { echo "dovecot: $*" >&2; }

# deb-src lists of our own, so the machine's apt configuration stays untouched.
apt_src() {
	command=$1
	shift
	"$command" -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
		-o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" "$@"
}

update_source_lists() {
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
	keyring=/usr/share/keyrings/debian-archive-keyring.gpg
	cat >"$apt_dir/sources.list" <<-EOF
	deb-src [signed-by=$keyring] http://deb.debian.org/debian $suite main
	deb-src [signed-by=$keyring] http://deb.debian.org/debian $suite-updates main
	deb-src [signed-by=$keyring] http://deb.debian.org/debian-security $suite-security main
	EOF
	apt_src apt-get update -qq >/dev/null
}

# Newest first. The security suite's newest source is sometimes not on the mirror even
# when its binaries are: the caller falls back to the next version, and says so.
source_versions() {
	apt_src apt-cache showsrc dovecot | sed -n 's/^Version: //p' | sort -u -r -V
}

fetch_source() {
	workdir=$1
	newest=
	for version in $(source_versions); do
		[ -n "$newest" ] || newest=$version
		if (cd "$workdir" && apt_src apt-get source -qq "dovecot=$version" >/dev/null 2>&1); then
			[ "$version" = "$newest" ] ||
				say "WARNING: the source of $newest is not downloadable here; built $version." \
					"apt will prefer Debian's $newest over this build until it is rebuilt."
			echo "$version"
			return 0
		fi
	done
	say "no dovecot source could be downloaded for $suite"
	return 1
}

add_patch_and_changelog() {
	tree=$1 version=$2 ours=$3
	patch -d "$tree" -p1 --dry-run -s <"$patch" >/dev/null ||
		{ say "instant-idle.patch does not apply to dovecot $version"; return 1; }
	# dpkg-buildpackage applies it with Debian's own patches (source format 3.0 quilt).
	cp "$patch" "$tree/debian/patches/chatmail-instant-idle.patch"
	echo chatmail-instant-idle.patch >>"$tree/debian/patches/series"
	{
		printf 'dovecot (%s) %s; urgency=medium\n\n' "$ours" "$suite"
		printf '  * Rebuild of %s for chatmail-relay with one patch:\n' "$version"
		printf '    chatmail-instant-idle.patch wakes IMAP IDLE clients without the\n'
		printf '    500 ms delay after each mailbox change.\n\n'
		printf ' -- chatmail-relay developers <relay@chatmail.invalid>  %s\n\n' "$(date -R)"
		cat "$tree/debian/changelog"
	} >"$tree/debian/changelog.new"
	mv "$tree/debian/changelog.new" "$tree/debian/changelog"
}

# Built as on Debian's build daemons, where Dovecot's test suite passes: as nobody (one
# test fails as root, expecting a permission error), offline in a network namespace with
# loopback only (one test expects connecting to 192.168.0.0 to fail, which a network that
# answers anything breaks), and without valgrind (Dovecot's tests run under it when it is
# installed, and it reports glibc's dynamic loader on Debian 12), in a short path (its
# tests make unix sockets deep in the tree, and socket paths end at 108 bytes).
build_offline_as_nobody() {
	tree=$1
	chown -R nobody:nogroup "$(dirname "$tree")"
	(cd "$tree" && unshare --net sh -c 'ip link set lo up && exec "$@"' sh \
		setpriv --reuid=nobody --regid=nogroup --clear-groups \
		env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$(dirname "$tree")" LANG=C.UTF-8 \
		NOVALGRIND=true DEB_BUILD_OPTIONS="parallel=$(nproc) ${DEB_BUILD_OPTIONS:-}" \
		dpkg-buildpackage -b -us -uc --no-sign >../build.log 2>&1) || {
		tail -60 "$(dirname "$tree")/build.log" >&2
		say "build failed; the tree is kept for a look: $(dirname "$tree") (build.log there)"
		keep_work=1
		return 1
	}
}

main() {
	mkdir -p "$cache" "$outdir"
	update_source_lists
	rm -rf /var/tmp/dovecot-build.*
	work=$(mktemp -d /var/tmp/dovecot-build.XXXXXX)
	keep_work=
	trap '[ -n "$keep_work" ] || rm -rf "$work"' EXIT
	version=$(fetch_source "$work")
	key=$(cat "$0" "$patch" | sha256sum | cut -c1-12)
	ours="$version+chatmail$revision"
	built=$cache/dovecot-$(echo "$ours" | tr ':' '_')-$key
	if [ ! -f "$built/.complete" ]; then
		say "building $ours (Debian's build with its tests: about 30 minutes on 2 cores)"
		tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'dovecot-*')
		add_patch_and_changelog "$tree" "$version" "$ours"
		DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq "$tree" >/dev/null
		build_offline_as_nobody "$tree"
		rm -rf "$built" && mkdir -p "$built"
		find "$work" -maxdepth 1 -name '*.deb' ! -name '*-dbgsym_*' -exec mv {} "$built/" \;
		touch "$built/.complete"
		# Builds of other versions or patches are stale now.
		for old in "$cache"/dovecot-*; do
			[ "$old" = "$built" ] || rm -rf "$old"
		done
	fi
	rm -f "$outdir"/dovecot-*.deb
	cp "$built"/*.deb "$outdir/"
	say "$ours in $outdir"
}

main
