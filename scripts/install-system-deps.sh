#!/usr/bin/env bash
# Installs Debian's iptables, nftables, iproute2 and conntrack when one of their commands is
# missing (kproxy drives these binaries; the kernel tests and the demo need them), and
# promtool from Debian's prometheus package when missing (tests/test_manifests.py checks the
# alert rules with it; ~3 s, the package itself is not installed).
set -euo pipefail
missing=()
for cmd in iptables-restore nft ip conntrack; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
need_promtool=0
command -v promtool >/dev/null 2>&1 || need_promtool=1
[ ${#missing[@]} -eq 0 ] && [ $need_promtool -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  [ ${#missing[@]} -eq 0 ] || echo "install-system-deps: missing ${missing[*]}; run as root to install iptables nftables iproute2 conntrack" >&2
  [ $need_promtool -eq 0 ] || echo "install-system-deps: missing promtool; run as root to install Debian's prometheus (the alert-rule tests are skipped without it)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-system-deps: installing iptables nftables iproute2 conntrack (missing: ${missing[*]})"
  apt-get install -y -qq iptables nftables iproute2 conntrack >/dev/null
fi
if [ $need_promtool -eq 1 ]; then
  # Only the promtool binary out of Debian's prometheus package: installing the package would
  # run its maintainer scripts (a system user, a Prometheus server started where services may
  # start), none of which the tests need.
  echo "install-system-deps: installing promtool from Debian's prometheus package"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null && dpkg-deb -x prometheus_*.deb root)
  install -m 0755 "$tmp/root/usr/bin/promtool" /usr/local/bin/promtool
fi
