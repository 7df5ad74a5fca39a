#!/bin/sh
# chatmail-relay's signed apt repository.
#   repo/build-repo.sh key FILE             export the signing key's public part (binary)
#   repo/build-repo.sh repo DIR [--suite SUITE] DEB... [--suite SUITE DEB...]...
#                                           write a signed repository into DIR (replaced
#                                           as a whole): the DEBs after --suite SUITE go
#                                           into suite SUITE (default: $REPO_SUITE, else
#                                           this machine's Debian release); for each suite
#                                           chatmail-relay-SUITE.sources, the file admins
#                                           download
# The key is $SIGNING_KEY (a fingerprint in the caller's GNUPGHOME) when set; otherwise a
# throw-away key made once and kept outside the checkout, for local and test repositories.
# The repository's address for the published .sources file is $CHATMAIL_REPO_URL.
# $REPO_DATE (RFC 2822) dates the Release file instead of now: apt ignores a Release file
# older than the one it has, so a repository built later but standing for an earlier
# publication (the tests' previous release) must say so.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cache=${CHATMAIL_BUILD_CACHE:-/var/cache/chatmail-relay-build}
# Chosen once: changing them later makes every client run apt update --allow-releaseinfo-change.
# (The system tests override them to stand in for Debian's security archive.)
ORIGIN=${REPO_ORIGIN:-chatmail-relay}
LABEL=${REPO_LABEL:-chatmail-relay}
# shellcheck disable=SC1091 # the host's
default_suite=${REPO_SUITE:-$(. /etc/os-release && echo "$VERSION_CODENAME")}
arch=$(dpkg --print-architecture)
repo_url=${CHATMAIL_REPO_URL:-file:///srv/chatmail-relay}

use_signing_key() {
	if [ -n "${SIGNING_KEY:-}" ]; then
		key=$SIGNING_KEY
		return 0
	fi
	GNUPGHOME=$cache/gnupg
	export GNUPGHOME
	if [ ! -f "$GNUPGHOME/.complete" ]; then
		echo "repository: making a throw-away signing key in $GNUPGHOME" >&2
		rm -rf "$GNUPGHOME" && mkdir -p "$GNUPGHOME" && chmod 700 "$GNUPGHOME"
		gpg --batch --quiet --passphrase '' --quick-generate-key \
			"chatmail-relay local repository (throw-away key) <relay@chatmail.invalid>" \
			ed25519 sign never
		touch "$GNUPGHOME/.complete"
	fi
	key=$(gpg --batch --with-colons --list-secret-keys | awk -F: '$1 == "fpr" { print $10; exit }')
}

export_key() {
	use_signing_key
	gpg --batch --export "$key" >"$1.tmp"
	[ -s "$1.tmp" ] || { echo "repository: no public key $key in gpg's keyring" >&2; exit 1; }
	mv "$1.tmp" "$1"
}

# write_indexes DIR SUITE
write_indexes() {
	dir=$1
	suite=$2
	mkdir -p "$dir/dists/$suite/main/binary-$arch"
	(cd "$dir" && apt-ftparchive packages "pool/$suite") >"$dir/dists/$suite/main/binary-$arch/Packages"
	gzip -9 -n -k "$dir/dists/$suite/main/binary-$arch/Packages"
	(cd "$dir" && apt-ftparchive \
		-o APT::FTPArchive::Release::Origin="$ORIGIN" \
		-o APT::FTPArchive::Release::Label="$LABEL" \
		-o APT::FTPArchive::Release::Suite="$suite" \
		-o APT::FTPArchive::Release::Codename="$suite" \
		-o APT::FTPArchive::Release::Architectures="$arch" \
		-o APT::FTPArchive::Release::Components=main \
		-o APT::FTPArchive::Release::Description="chatmail-relay and its instant-IDLE Dovecot plugin" \
		${REPO_DATE:+-o APT::FTPArchive::Release::Date="$REPO_DATE"} \
		release "dists/$suite") >"$dir/dists/$suite/Release.tmp"
	mv "$dir/dists/$suite/Release.tmp" "$dir/dists/$suite/Release"
}

# sign_release DIR SUITE
sign_release() {
	release=$1/dists/$2/Release
	gpg --batch --yes --local-user "$key" --digest-algo SHA512 --clearsign -o "${release%Release}InRelease" "$release"
	gpg --batch --yes --local-user "$key" --digest-algo SHA512 -abs -o "$release.gpg" "$release"
}

build_repo() {
	out=$1
	shift
	use_signing_key
	tmp=$out.tmp
	rm -rf "$tmp" && mkdir -p "$tmp"
	suite=$default_suite
	suites=""
	count=0
	while [ $# -gt 0 ]; do
		if [ "$1" = --suite ]; then
			suite=${2:?--suite needs a name}
			shift 2
			continue
		fi
		mkdir -p "$tmp/pool/$suite/main"
		cp "$1" "$tmp/pool/$suite/main/"
		case " $suites " in *" $suite "*) ;; *) suites="$suites $suite" ;; esac
		count=$((count + 1))
		shift
	done
	[ -n "$suites" ] || { echo "repository: no packages given" >&2; exit 2; }
	for suite in $suites; do
		write_indexes "$tmp" "$suite"
		sign_release "$tmp" "$suite"
		sed -e "s|@REPO_URL@|$repo_url|" -e "s|@SUITE@|$suite|" \
			"$here/../apt/chatmail-relay.sources.in" >"$tmp/chatmail-relay-$suite.sources"
	done
	gpg --batch --export "$key" >"$tmp/chatmail-archive-keyring.pgp"
	rm -rf "$out" && mv "$tmp" "$out"
	echo "repository: $out (suites$suites; $count packages, key $key)" >&2
}

case "${1:-}" in
key) export_key "$2" ;;
repo)
	shift
	build_repo "$@"
	;;
*)
	echo "usage: $0 key FILE | repo DIR [--suite SUITE] DEB..." >&2
	exit 2
	;;
esac
