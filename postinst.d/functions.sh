# shellcheck shell=sh
# Shared by the steps (sourced, not run). POSIX sh.

say() {
	printf 'chatmail: %s\n' "$*"
}

fail() {
	printf 'chatmail: error: %s\n' "$*" >&2
	exit 1
}

# service ACTION NAME: start, reload-or-restart, or is-active, through the platform's
# service manager. On Debian, deb-systemd-invoke honours policy-rc.d, so image builders
# and test hosts can keep services from starting.
service() {
	case "$PLATFORM_SERVICE_MANAGER" in
	systemd)
		if [ "$1" = is-active ]; then
			systemctl --quiet is-active "$2"
		elif command -v deb-systemd-invoke >/dev/null; then
			deb-systemd-invoke "$1" "$2"
		else
			systemctl "$1" "$2"
		fi
		;;
	openrc)
		case "$1" in
		is-active) rc-service --quiet "$2" status ;;
		reload-or-restart) rc-service "$2" reload || rc-service "$2" restart ;;
		*) rc-service "$2" "$1" ;;
		esac
		;;
	*) fail "unknown service manager '$PLATFORM_SERVICE_MANAGER'" ;;
	esac
}

is_ipv4_relay() {
	[ -n "$CHATMAIL_IPV4_RELAY" ]
}

# record_created PATH: a file made at install (key, certificate, secret) that purge
# removes. Files the admin brought are never recorded.
record_created() {
	list=$PLATFORM_STATE_DIR/created.list
	grep -qxF "$1" "$list" 2>/dev/null || echo "$1" >>"$list"
}
