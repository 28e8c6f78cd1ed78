#!/bin/sh
# Builds the egress-agent image without pulling any base image (for machines that cannot reach
# a container registry): an empty image with the agent binary and the shared libraries it
# links (glibc and libgcc from the host's Debian packages: what gcr.io/distroless/cc-debian12
# holds), entrypoint and command as in deploy/Dockerfile. Needs buildah (Debian package).
#
#   scripts/image-from-binary.sh [BINARY [IMAGE]]   # default target/release/egress-agent, egress-agent:0.1.0
set -eu
bin=${1:-target/release/egress-agent}
image=${2:-egress-agent:0.1.0}
[ -x "$bin" ] || { echo "$bin: no such executable (cargo build --release -p egress-agent)" >&2; exit 1; }
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")
install -D -m 0755 "$bin" "$root/usr/local/bin/egress-agent"
strip --strip-debug "$root/usr/local/bin/egress-agent" 2>/dev/null || true
# The dynamic loader and every library ldd names, at their paths.
for lib in $(ldd "$bin" | awk '/=> \//{print $3} /^\t\//{print $1}'); do
    install -D -m 0644 "$(readlink -f "$lib")" "$root$lib"
done
mkdir -p "$root/tmp" "$root/run/egress" "$root/var/lib/egress" "$root/sys" "$root/proc" "$root/dev"
buildah umount "$ctr" >/dev/null
buildah config --entrypoint '["/usr/local/bin/egress-agent"]' --cmd '["run","--kubernetes"]' \
    --label org.opencontainers.image.source=deploy/Dockerfile "$ctr"
buildah commit --quiet "$ctr" "$image" >/dev/null
echo "$image"
