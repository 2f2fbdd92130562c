#!/usr/bin/env bash
# Installs Debian's iptables, nftables, iproute2 and conntrack when one of their commands is
# missing. kproxy drives these binaries; the kernel tests and the demo need them.
set -euo pipefail
missing=()
for cmd in iptables-restore nft ip conntrack; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: missing ${missing[*]}; run as root to install iptables nftables iproute2 conntrack" >&2
  exit 0
fi
echo "install-system-deps: installing iptables nftables iproute2 conntrack (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq iptables nftables iproute2 conntrack >/dev/null
