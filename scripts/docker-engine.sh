#!/usr/bin/env bash
# A Docker engine for `kflift images build` and `kflift run --runner docker`, on a machine that may
# have none (CI, a bare VM). Idempotent; each step says what it does and is skipped when done:
#   1. install docker.io and debootstrap with apt when dockerd/debootstrap are missing (needs root);
#   2. start dockerd when no engine answers (overlay2, no iptables, no default bridge: stages use the
#      host network), its log in $KFLIFT_DOCKERD_LOG; it is left running;
#   3. make the base image kflift-base:bookworm (Debian bookworm, Python 3.11) with debootstrap and
#      `docker import` when absent, for hosts that cannot pull python:3.11-slim from a registry.
# Environment (defaults in brackets):
#   KFLIFT_DOCKER_ROOT [/var/lib/kflift-docker]  dockerd --data-root
#   KFLIFT_DOCKERD_LOG [/var/log/kflift-dockerd.log]
#   KFLIFT_BASE_IMAGE  [kflift-base:bookworm]     SKIP_BASE_IMAGE [0] 1 = only the engine
#   DEBIAN_MIRROR      [the first deb.debian.org-style URI apt uses, else http://deb.debian.org/debian]
set -euo pipefail

DATA_ROOT="${KFLIFT_DOCKER_ROOT:-/var/lib/kflift-docker}"
LOG="${KFLIFT_DOCKERD_LOG:-/var/log/kflift-dockerd.log}"
BASE_IMAGE="${KFLIFT_BASE_IMAGE:-kflift-base:bookworm}"
SKIP_BASE_IMAGE="${SKIP_BASE_IMAGE:-0}"
START_TIMEOUT=60

say() { printf '==> docker-engine: %s\n' "$*"; }
die() { printf 'docker-engine: error: %s\n' "$*" >&2; exit 1; }
answers() { docker info >/dev/null 2>&1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "$1 needs root (run with sudo, or do it by hand: $2)"
}

# 1. packages
missing=()
command -v dockerd >/dev/null 2>&1 || answers || missing+=(docker.io)
if [ "$SKIP_BASE_IMAGE" != 1 ]; then command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap); fi
if [ ${#missing[@]} -gt 0 ]; then
  need_root "installing ${missing[*]}" "apt-get install ${missing[*]}"
  command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install ${missing[*]} by hand"
  say "installing ${missing[*]} (apt)"
  t0=$SECONDS
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  say "installed in $((SECONDS - t0)) s"
else
  say "packages present"
fi

# 2. engine
if answers; then
  say "an engine already answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
else
  need_root "starting dockerd" "dockerd --storage-driver overlay2 --iptables=false --bridge=none"
  mkdir -p "$DATA_ROOT" "$(dirname "$LOG")" /run/kflift-docker
  say "starting dockerd (data root $DATA_ROOT, log $LOG)"
  t0=$SECONDS
  # setsid: its own session, so the caller's Ctrl-C or exit does not stop it.
  setsid dockerd --storage-driver overlay2 --iptables=false --bridge=none --data-root "$DATA_ROOT" \
    --pidfile /run/kflift-docker/dockerd.pid >>"$LOG" 2>&1 </dev/null &
  pid=$!
  deadline=$((SECONDS + START_TIMEOUT))
  until answers; do
    kill -0 "$pid" 2>/dev/null || die "dockerd exited at start; its log: $LOG ($(tail -n 1 "$LOG"))"
    [ $SECONDS -lt $deadline ] || die "dockerd (pid $pid) did not answer within ${START_TIMEOUT}s; its log: $LOG"
    sleep 0.5
  done
  say "dockerd (pid $pid) answers after $((SECONDS - t0)) s"
fi

# 3. base image
if [ "$SKIP_BASE_IMAGE" = 1 ]; then
  say "base image skipped (SKIP_BASE_IMAGE=1)"
elif docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base image $BASE_IMAGE present"
else
  need_root "debootstrap" "debootstrap --variant=minbase bookworm DIR"
  # apt's own mirror (comments skipped: they may name an old snapshot), else Debian's CDN
  mirror="${DEBIAN_MIRROR:-$(grep -rhE '^[^#]*https?://' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
                             | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n 1 || true)}"
  cdn=http://deb.debian.org/debian
  mirror="${mirror:-$cdn}"
  rootfs="$(mktemp -d /var/tmp/kflift-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  t0=$SECONDS
  for try in "$mirror" "$cdn"; do
    say "building $BASE_IMAGE: debootstrap bookworm from $try (about a minute or three)"
    rm -rf "$rootfs" && mkdir "$rootfs"
    if debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$rootfs" "$try" \
         >"$rootfs.log" 2>&1; then break; fi
    [ "$try" != "$cdn" ] || die "debootstrap failed; its log: $rootfs.log ($(tail -n 1 "$rootfs.log"))"
    say "debootstrap from $try failed ($(tail -n 1 "$rootfs.log")); trying $cdn"
  done
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm minbase + Python 3.11 (debootstrap)"' \
    - "$BASE_IMAGE" >/dev/null
  rm -f "$rootfs.log"
  say "$BASE_IMAGE imported after $((SECONDS - t0)) s ($(docker image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
fi
say "ready: build the images with  kflift images build --base-image $BASE_IMAGE"
