#!/usr/bin/env bash
# Build a local Docker base image with Debian's Python 3.11 (bookworm), without
# any container registry: debootstrap a minimal root filesystem from the Debian
# mirror this machine's apt already uses, then `docker import` it.
#
# Idempotent: if the image already exists, it exits 0 at once.
# Needs: root, debootstrap, a running Docker daemon.
#
# Overridable with environment variables:
#   IMAGE   image tag           (default local/python:3.11-bookworm)
#   SUITE   Debian suite        (default bookworm)
#   MIRROR  Debian mirror URL   (default: first `deb` URL for $SUITE main in
#                                the apt sources, else http://deb.debian.org/debian)
#   TMPDIR  where the temporary root filesystem is built (default /var/tmp)
set -euo pipefail

IMAGE="${IMAGE:-local/python:3.11-bookworm}"
SUITE="${SUITE:-bookworm}"
PACKAGES="python3,python3-venv,python3-pip,tini,ca-certificates"
FALLBACK_MIRROR="http://deb.debian.org/debian"

log() { printf '[base-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker client not found"

# Fast path: nothing to do if the image is already there.
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists, nothing to do"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs it)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"
docker info >/dev/null 2>&1 || die "Docker daemon not reachable (docker info failed)"

# Print the first `deb` URI serving "$SUITE main", from one-line *.list files
# and deb822 *.sources files (in apt's order: sources.list first, then
# sources.list.d/ sorted). Only http(s) URIs are taken.
find_mirror() {
    local f
    local -a files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*; do   # glob order = apt's order
        case "$f" in *.list | *.sources) [ -f "$f" ] && files+=("$f") ;; esac
    done
    [ "${#files[@]}" -gt 0 ] || return 0
    for f in "${files[@]}"; do
        case "$f" in
        *.list)
            # deb [opt=val ...] URI SUITE COMPONENT...
            awk -v suite="$SUITE" '
                { sub(/#.*/, "") }
                $1 != "deb" { next }
                {
                    i = 2
                    if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    uri = $(i); s = $(i + 1)
                    if (s != suite || uri !~ /^https?:\/\//) next
                    for (j = i + 2; j <= NF; j++) if ($j == "main") { print uri; exit }
                }' "$f"
            ;;
        *.sources)
            # deb822 stanzas separated by blank lines; fields may continue on
            # indented lines; lines starting with # are comments.
            awk -v suite="$SUITE" '
                function has(list, word,   n, a, k) {
                    n = split(list, a, /[ \t]+/)
                    for (k = 1; k <= n; k++) if (a[k] == word) return 1
                    return 0
                }
                function flush(   n, a, k) {
                    if (enabled != "no" && has(types, "deb") && has(suites, suite) && has(comps, "main")) {
                        n = split(uris, a, /[ \t]+/)
                        for (k = 1; k <= n; k++) if (a[k] ~ /^https?:\/\//) { print a[k]; done = 1; exit }
                    }
                    types = uris = suites = comps = enabled = ""; last = ""
                }
                /^#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { # continuation of the previous field
                    v = $0; gsub(/^[ \t]+|[ \t]+$/, "", v)
                    if (last == "types") types = types " " v
                    else if (last == "uris") uris = uris " " v
                    else if (last == "suites") suites = suites " " v
                    else if (last == "components") comps = comps " " v
                    next
                }
                {
                    k = tolower($0); sub(/:.*/, "", k)
                    v = $0; sub(/^[^:]*:[ \t]*/, "", v); gsub(/[ \t]+$/, "", v)
                    last = k
                    if (k == "types") types = v
                    else if (k == "uris") uris = v
                    else if (k == "suites") suites = v
                    else if (k == "components") comps = v
                    else if (k == "enabled") enabled = tolower(v)
                }
                END { if (!done) flush() }' "$f"
            ;;
        esac
    done | head -n 1
}

if [ -z "${MIRROR:-}" ]; then
    MIRROR="$(find_mirror || true)"
    MIRROR="${MIRROR:-$FALLBACK_MIRROR}"
fi
MIRROR="${MIRROR%/}"

# One build at a time; re-check after taking the lock.
exec 9>/var/lock/base-image.lock
flock 9
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE was built meanwhile, nothing to do"
    exit 0
fi

DIR="$(mktemp -d "${TMPDIR:-/var/tmp}/base-image.XXXXXX")"
cleanup() {
    # debootstrap mounts proc/sys inside the target; never rm -rf through them.
    local m
    if [ -d "$DIR" ]; then
        for m in $(awk -v d="$DIR" 'index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r); do
            umount -l "$m" 2>/dev/null || true
        done
        rm -rf --one-file-system "$DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(date +%s)
log "debootstrap $SUITE from $MIRROR into $DIR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$DIR" "$MIRROR"
t1=$(date +%s)

log "trimming apt caches, lists, docs and logs"
rm -rf "$DIR"/var/cache/apt/* "$DIR"/var/lib/apt/lists/* \
       "$DIR"/usr/share/doc/* "$DIR"/usr/share/man/* "$DIR"/usr/share/info/* \
       "$DIR"/var/cache/debconf/*-old "$DIR"/var/lib/dpkg/*-old \
       "$DIR"/var/log/* "$DIR"/tmp/* "$DIR"/root/.cache
find "$DIR"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
# Keep later `apt-get install`s in the image from bringing docs back.
mkdir -p "$DIR"/etc/dpkg/dpkg.cfg.d
cat > "$DIR"/etc/dpkg/dpkg.cfg.d/01-nodoc <<'NODOC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
NODOC
: > "$DIR"/etc/hostname
t2=$(date +%s)

log "importing into $IMAGE"
tar -C "$DIR" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap $SUITE minbase + $PACKAGES from $MIRROR" \
    - "$IMAGE" >/dev/null
t3=$(date +%s)

cleanup
trap - EXIT

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "built $IMAGE: $(awk -v b="$size" 'BEGIN{printf "%.1f MB", b/1e6}')"
log "took $((t3 - t0))s (debootstrap $((t1 - t0))s, trim $((t2 - t1))s, import $((t3 - t2))s)"
