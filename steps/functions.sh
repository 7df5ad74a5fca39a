# shellcheck shell=sh
# Shared by the shell steps (sourced, not run). POSIX sh.

say() {
	printf 'chatmail: %s\n' "$*"
}

fail() {
	printf 'chatmail: error: %s\n' "$*" >&2
	exit 1
}

is_ipv4_relay() {
	[ -n "$CHATMAIL_IPV4_RELAY" ]
}

# record_created PATH: a file made at install (key, certificate) that purge removes.
# Files the admin brought are never recorded. (The Python steps write the same list:
# apply.record_created.)
record_created() {
	list=$PLATFORM_STATE_DIR/created.list
	grep -qxF "$1" "$list" 2>/dev/null || echo "$1" >>"$list"
}
