#!/bin/sh
# apk runs this after a transaction that changed files in /usr/sbin or
# /usr/libexec/postfix, where the relay's daemons have their programs, or in Dovecot's
# module directory (and once when chatmail-relay itself is installed or upgraded).
# Debian's packages restart their daemons when upgraded, Alpine's do not: restart those
# of the relay's daemons that still run a program apk replaced. A Dovecot left running refuses every new login until it is
# restarted (its processes check that they are the master's version), and the others
# would go on running the code a security update replaced.

command -v rc-service >/dev/null || exit 0

# apk passes the directories that changed. Dovecot's module directory: the instant-IDLE
# plugin may have come or gone (apk installs it with the relay where the repository has
# it), and Dovecot's configuration names it only while it is there (a missing plugin
# fails every IMAP login). Unchanged, configure changes nothing; without chatmail.ini
# there is no relay to configure yet (post-install says what to run).
case " $* " in
*" /usr/lib/dovecot "*)
	[ ! -f /etc/chatmail/chatmail.ini ] || chatmail configure </dev/null ||
		echo "chatmail-relay: 'chatmail configure' failed: run it again once fixed" >&2
	;;
esac
# The programs running processes were started from that are gone (replaced) since.
replaced=$(for exe in /proc/[0-9]*/exe; do readlink "$exe" 2>/dev/null; done |
	sed -n 's/ (deleted)$//p' | sort -u)
while read -r service program; do
	printf '%s\n' "$replaced" | grep -qxF "$program" || continue
	echo "chatmail-relay: restarting $service (apk replaced $program)"
	rc-service --quiet "$service" restart </dev/null ||
		echo "chatmail-relay: restarting $service failed: see 'rc-service $service status'" >&2
done <<-LIST
	chatmail-dovecot /usr/sbin/dovecot
	postfix /usr/libexec/postfix/master
	nginx /usr/sbin/nginx
	opendkim.chatmail /usr/sbin/opendkim
LIST
exit 0
