#!/bin/sh
# TLS session tickets against the 40 ms after the handshake (results/starttls-tickets.md):
# a private Postfix instance of this machine's postfix package on 127.0.0.1, with smtpd
# services for "25" (port 2525, STARTTLS), "587" (2587, STARTTLS) and "465" (2465, wrapper
# mode) and a self-signed ECDSA P-256 certificate, switched ROUNDS times between the TLS
# settings as before and as now (conf/postfix), restarted each time; starttls_probe.py
# connects to each port, offering the previous connection's session, and
# `openssl s_client -msg` counts the session tickets of a first and a second connection.
# Needs root and the postfix package; starts nothing else and leaves nothing behind.
# On Debian 13 without a booted system: tests/chroot.sh unshare --net sh -c
#   'ip link set lo up && cd /src && bench/starttls_tickets.sh'
# (on the host itself, ports 2465, 2525 and 2587 of 127.0.0.1 must be free)
# Usage: bench/starttls_tickets.sh [ROUNDS]
set -eu
rounds=${1:-3}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d /tmp/starttls-tickets.XXXXXX)
etc=$dir/etc
mkdir -p "$etc" "$dir/data"
chmod 755 "$dir"  # postfix reaches its data directory through it
stop() {
	if [ -s "$dir/queue/pid/master.pid" ]; then
		kill "$(tr -d ' ' <"$dir/queue/pid/master.pid")" 2>/dev/null || true
		sleep 2
		rm -f "$dir/queue/pid/master.pid"
	fi
}

trap 'stop; [ -n "${KEEP:-}" ] || rm -rf --one-file-system "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -days 2 \
	-keyout "$etc/key.pem" -out "$etc/cert.pem" -subj /CN=stall.test 2>/dev/null
# as before this change: no tickets from OpenSSL for any Postfix daemon
printf '%s\n' 'openssl_conf = init' '[init]' 'ssl_conf = ssl' '[ssl]' \
	'system_default = tls' '[tls]' 'NumTickets = 0' >"$etc/before.cnf"
cp "$here/../conf/postfix/openssl.cnf.j2" "$etc/now.cnf"
cat >"$etc/main.cf" <<END
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = stall.test
mydestination =
alias_maps =
smtpd_tls_cert_file = $etc/cert.pem
smtpd_tls_key_file = $etc/key.pem
smtpd_tls_security_level = may
maillog_file = $dir/maillog
maillog_file_prefixes = /tmp
END
cat >"$etc/master.cf" <<'END'
2525      inet  n       -       n       -       -       smtpd
  -o smtpd_tls_security_level=encrypt
2587      inet  n       -       n       -       -       smtpd
  -o smtpd_tls_security_level=encrypt
2465      inet  n       -       n       -       -       smtpd
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
anvil     unix  -       -       n       -       1       anvil
proxymap  unix  -       -       n       -       -       proxymap
rewrite   unix  -       -       n       -       -       trivial-rewrite
postlog   unix-dgram n  -       n       -       1       postlogd
END
[ -f /etc/postfix/dynamicmaps.cf ] && cp /etc/postfix/dynamicmaps.cf "$etc/"
mkdir -p "$dir/queue/pid"
for sub in private public incoming active deferred defer bounce trace flush hold corrupt; do
	mkdir -p "$dir/queue/$sub"
	chown postfix "$dir/queue/$sub"
done
chown postfix "$dir/data"

# state before|now: the TLS settings of conf/postfix as they were / are, master restarted
state() {
	postconf -c "$etc" -PX 2525/inet/tls_session_ticket_cipher \
		2587/inet/tls_session_ticket_cipher 2465/inet/tls_session_ticket_cipher \
		2465/inet/tls_config_name
	postconf -c "$etc" -P '2587/inet/tls_session_ticket_cipher=' \
		'2465/inet/tls_session_ticket_cipher='
	if [ "$1" = now ]; then
		postconf -c "$etc" -P '2525/inet/tls_session_ticket_cipher=' \
			2465/inet/tls_config_name=chatmail_smtps
	fi
	postconf -c "$etc" -e "import_environment = MAIL_CONFIG LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME OPENSSL_CONF=$etc/$1.cnf"
	stop
	(cd "$dir" && MAIL_CONFIG=$etc setsid /usr/lib/postfix/sbin/master -c "$etc" -d \
		>"$dir/master.out" 2>&1 &)
	/usr/bin/python3 -c 'import socket, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", 2465)).close()
        break
    except OSError:
        time.sleep(0.1)'
	sleep 1
}

tickets() {  # port [starttls]: NewSessionTicket messages on a first and a second connection
	opts=${2:+-starttls $2}
	for sess in "-sess_out $dir/sess" "-sess_in $dir/sess"; do
		# shellcheck disable=SC2086
		(sleep 1; printf 'QUIT\r\n') | openssl s_client $opts -connect "127.0.0.1:$1" \
			-msg -ign_eof $sess 2>&1 | grep -c 'NewSessionTicket' || true
	done | paste -sd/
}

echo "postfix $(postconf -c "$etc" -h mail_version), $(openssl version)"
round=1
while [ "$round" -le "$rounds" ]; do
	for s in before now; do
		state "$s"
		echo "=== round $round: $s"
		/usr/bin/python3 "$here/starttls_probe.py" 127.0.0.1 2525 7 reuse
		/usr/bin/python3 "$here/starttls_probe.py" 127.0.0.1 2587 4 reuse
		/usr/bin/python3 "$here/starttls_probe.py" 127.0.0.1 2465 4 reuse
		if [ "$round" = 1 ]; then
			echo "tickets (first/second connection): 25 $(tickets 2525 smtp)," \
				"587 $(tickets 2587 smtp), 465 $(tickets 2465)"
		fi
	done
	round=$((round + 1))
done
