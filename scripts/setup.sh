#!/usr/bin/env bash
# Idempotent machine setup for building and testing egress (Debian 12, root).
#
# Installs: the apt packages the build, the tests and the demo use; rust-src for the eBPF
# toolchain; bpf-linker built from crates.io against that toolchain's own libLLVM.
# Warm re-runs only check and cost a second or two. Never runs `rustup update`.
set -euo pipefail

# The eBPF toolchain: stable, with RUSTC_BOOTSTRAP=1 set only for the nested eBPF build
# (see egress-agent/build.rs). Overridable, e.g. EGRESS_EBPF_TOOLCHAIN=nightly.
T=${EGRESS_EBPF_TOOLCHAIN:-stable}
BPF_LINKER_VERSION=0.13.0
APT_PACKAGES=(build-essential iproute2 iputils-ping curl python3 netcat-openbsd bpftool openssl openssh-server openssh-client git prometheus dante-server microsocks squid nghttp2-proxy dnsmasq-base bind9-dnsutils nginx)

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages with daemons (openssh-server) must not start them machine-wide: the tests run
  # their own instances on loopback addresses. policy-rc.d exit 101 = "do not start".
  prc=/usr/sbin/policy-rc.d
  own_prc=0
  if [ ! -e "$prc" ]; then printf '#!/bin/sh\nexit 101\n' > "$prc"; chmod +x "$prc"; own_prc=1; fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || { ((own_prc)) && rm -f "$prc"; exit 1; }
  ((own_prc)) && rm -f "$prc"
fi

# Offline validation of the Kubernetes manifests (tests/e2e/deploy.rs): `kubectl kustomize`,
# and kubernetes-validate from PyPI (the Kubernetes schemas are bundled in its wheel; it also
# brings jsonschema and PyYAML for scripts/validate-crd-objects.py). A kubectl already on the
# machine (e.g. the `kubectl` apt package of Google's repository, 1.32 here) is used when it
# has kustomize; otherwise Debian's kubernetes-client.
if ! kubectl kustomize --help >/dev/null 2>&1; then
  log "installing kubernetes-client (kubectl) for kubectl kustomize"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
if ! python3 -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  log "installing kubernetes-validate from PyPI"
  python3 -m pip install -q kubernetes-validate 2>/dev/null \
    || python3 -m pip install -q --break-system-packages kubernetes-validate
fi

if ! rustup component list --toolchain "$T" --installed | grep -q '^rust-src'; then
  log "adding rust-src to toolchain $T"
  rustup component add rust-src --toolchain "$T"
fi

# bpf-linker's LLVM major must equal the eBPF rustc's; link it against that rustc's own libLLVM.
S=$(rustup run "$T" rustc --print sysroot)
MAJOR=$(rustup run "$T" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
LIB=$(cd "$S/lib" && ls libLLVM.so.* | head -1)
P=$HOME/.cargo/egress-llvm/$T # persistent: bpf-linker's rpath points here
BIN=$HOME/.cargo/bin/bpf-linker
if [ -x "$BIN" ] && readelf -d "$BIN" 2>/dev/null | grep -qF "$LIB" \
   && "$BIN" --version 2>/dev/null | grep -qF "$BPF_LINKER_VERSION"; then
  exit 0
fi
log "building bpf-linker $BPF_LINKER_VERSION against $LIB (LLVM $MAJOR of toolchain $T), about a minute"
mkdir -p "$P/lib"
ln -sfn "$S/lib/$LIB" "$P/lib/libLLVM.so"
ln -sfn "$S/lib/$LIB" "$P/lib/$LIB"
LLVM_PREFIX=$P cargo +"$T" install bpf-linker --version "$BPF_LINKER_VERSION" --locked --force \
  --no-default-features --features "llvm-$MAJOR"
