#!/bin/sh
# Prepare the directories the sidecar shares with the HAProxy container, whose
# processes run as the unprivileged `haproxy` user: the socket directory must
# be writable by it, and the config directory readable.
set -eu
haproxy_uid=$(id -u haproxy 2>/dev/null || echo 99)
haproxy_gid=$(id -g haproxy 2>/dev/null || echo 99)
socket_dir=$(dirname "${MOMUS_MASTER_SOCKET:-/run/haproxy/master.sock}")
mkdir -p "$socket_dir" "${MOMUS_CONFIG_DIR:-/usr/local/etc/haproxy}"
chown "$haproxy_uid:$haproxy_gid" "$socket_dir"
chmod 0750 "$socket_dir"
chmod 0755 "${MOMUS_CONFIG_DIR:-/usr/local/etc/haproxy}"
exec "$@"
