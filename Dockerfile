# kproxy's image: what manifests/base/daemonset.yaml runs on every node.
#   docker build -t REGISTRY/kproxy:0.1.0 .
# The iptables backend is chosen at start, as kubernetes-sigs/iptables-wrappers does, by kproxy
# itself (`--iptables-backend auto`, the default: the kubelet's KUBE-IPTABLES-HINT chain, else
# the backend holding more rules), and kproxy then runs iptables-nft-* or iptables-legacy-*
# by name. So there is no wrapper script and no update-alternatives at start, which the
# DaemonSet's read-only root filesystem would not allow anyway. (A shell in the container,
# `kubectl exec ... iptables-save`, uses Debian's default, nft: call iptables-legacy-save
# explicitly on a legacy node.)

# -- build: the kproxy wheel and the wheels of its dependencies
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kproxy ./kproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- run
FROM python:3.11-slim-bookworm
# iptables ships both backends (iptables-nft-*, iptables-legacy-*); nftables for --mode
# nftables; conntrack to look at flows by hand (kproxy itself deletes them over netlink).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables conntrack \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels kproxy \
    && rm -rf /wheels
# kube-proxy's DaemonSet runs `/usr/local/bin/kube-proxy --config=... --hostname-override=...`
# (command: overrides the entrypoint): under that name kproxy is `kproxy run` with kube-proxy's
# command line (README "Replacing kube-proxy"), so the image swap is all it takes.
RUN ln -sf kproxy /usr/local/bin/kube-proxy
# The root filesystem is read-only in the DaemonSet: no .pyc written at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["kproxy", "run"]
