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
		# OpenRC still counts a service whose process died as started, and `start`
		# would only warn that it is: restart it first if it crashed.
		start) rc-service --ifcrashed "$2" restart && rc-service "$2" start ;;
		*) rc-service "$2" "$1" ;;
		esac
		;;
	*) fail "unknown service manager '$PLATFORM_SERVICE_MANAGER'" ;;
	esac
}

# A container without an init system has the relay's files but nothing to run its
# services with: say so once, instead of a "not found" per service.
require_service_manager() {
	case "$PLATFORM_SERVICE_MANAGER" in
	systemd) command -v systemctl >/dev/null ||
		fail "systemctl not found: the relay's services need systemd running" ;;
	openrc)
		command -v rc-service >/dev/null ||
			fail "rc-service not found: the relay's services need OpenRC (apk add openrc," \
				"then boot with it)"
		# OpenRC writes it when it enters a runlevel; without it (a container OpenRC did
		# not boot) rc-service fails with a misleading "already starting".
		[ -e /run/openrc/softlevel ] ||
			fail "OpenRC did not boot this system (no /run/openrc/softlevel): the relay's" \
				"services need OpenRC as the init system"
		;;
	esac
}

# retire_packaged_dovecot: on Alpine the relay runs Dovecot as its own service
# (chatmail-dovecot); the dovecot package's service, started or enabled before, would
# take the same ports.
retire_packaged_dovecot() {
	[ "$PLATFORM_DOVECOT_SERVICE" != dovecot ] || return 0
	if service is-active dovecot; then
		say "stopping dovecot: the relay runs Dovecot as $PLATFORM_DOVECOT_SERVICE"
		service stop dovecot
	fi
	if [ -e /etc/runlevels/default/dovecot ]; then
		rc-update del dovecot default >/dev/null
	fi
}

# forget_dead_postfix: Alpine's postfix init script keeps no pid file of its own, so
# OpenRC goes on counting Postfix as started after its master process died (or was
# stopped behind its back), and would neither start nor reload it. Postfix's own pid file
# tells: forget the state of a dead one, so that it is started.
forget_dead_postfix() {
	[ "$PLATFORM_SERVICE_MANAGER" = openrc ] || return 0
	service is-active postfix || return 0
	pid_file=$PLATFORM_POSTFIX_QUEUE_DIR/pid/master.pid
	[ -f "$pid_file" ] || return 0
	pid=$(tr -dc 0-9 <"$pid_file")
	[ "$(cat "/proc/${pid:-0}/comm" 2>/dev/null)" != master ] || return 0
	say "postfix is not running, although OpenRC counts it as started: starting it"
	rc-service --quiet postfix zap
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
