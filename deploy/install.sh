#!/usr/bin/env bash
# Install edgecl as a systemd service: user, folders, config, token, venv and unit. Idempotent: a second run
# changes nothing (existing config and token are kept). Run from a checkout: sudo deploy/install.sh
#
# On a Jetson (/etc/nv_tegra_release present) the venv is created with --system-site-packages so it reuses
# the L4T PyTorch already installed for the system python3; torch is never installed from PyPI there.
set -euo pipefail

readonly UNIT_NAME=edgecl.service
readonly SERVICE_USER=edgecl
readonly DEFAULT_VENV=/opt/edgecl/venv
readonly OPTIONAL_GROUPS=(video render jtop)

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [options]

Install edgecl as the systemd service "edgecl" (user edgecl, config in /etc/edgecl, data in /var/lib/edgecl).

Options:
  --prefix DIR     install under this root instead of / (staging, tests); implies --no-systemctl
  --venv DIR       virtual environment to create (default /opt/edgecl/venv)
  --jetson         Jetson (L4T): venv reuses the system PyTorch (--system-site-packages)
  --x86            x86_64 with an NVIDIA GPU: torch pinned by constraints.txt, profile x86-cuda
  --cpu            CPU only: torch pinned by constraints.txt, profile cpu
                   (default: detect; /etc/nv_tegra_release means Jetson, nvidia-smi means x86)
  --no-pip         do not create the venv nor run pip (tests, or a venv you manage yourself)
  --no-systemctl   do not create the user nor call systemctl/chown (automatic when --prefix is not /)
  --uninstall      stop and remove the service, unit, venv and /etc/edgecl; keep /var/lib/edgecl
  --purge          with --uninstall: also remove /var/lib/edgecl, /var/cache/edgecl and the edgecl user
  -h, --help       show this help

Environment: PYTHON (interpreter for the venv, default python3); PIP_INDEX_URL / PIP_EXTRA_INDEX_URL are
passed to pip unchanged (e.g. a local mirror).
EOF
}

log() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

PREFIX=/
VENV=$DEFAULT_VENV
PLATFORM=auto
DO_PIP=1
DO_SYSTEM=1
UNINSTALL=0
PURGE=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a folder"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --venv) [[ $# -ge 2 ]] || die "--venv needs a folder"; VENV=$2; shift 2 ;;
        --venv=*) VENV=${1#*=}; shift ;;
        --jetson) PLATFORM=jetson; shift ;;
        --x86) PLATFORM=x86; shift ;;
        --cpu) PLATFORM=cpu; shift ;;
        --no-pip) DO_PIP=0; shift ;;
        --no-systemctl) DO_SYSTEM=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[[ $VENV == /* ]] || die "--venv must be an absolute path, got '$VENV'"
[[ $PURGE -eq 0 || $UNINSTALL -eq 1 ]] || die "--purge only goes with --uninstall"
PREFIX=$(realpath -m -- "$PREFIX")
ROOT=${PREFIX%/}  # "" for /, so "$ROOT/etc" is /etc
if [[ -n $ROOT && $DO_SYSTEM -eq 1 ]]; then
    log "--prefix $PREFIX is not /: skipping useradd, chown and systemctl (as with --no-systemctl)"
    DO_SYSTEM=0
fi
if [[ $DO_SYSTEM -eq 1 && $EUID -ne 0 ]]; then
    die "run as root (sudo $0 $*), or pass --prefix DIR --no-systemctl to stage the files"
fi

SRC=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
ETC=$ROOT/etc/edgecl
UNIT_DIR=$ROOT/etc/systemd/system
UNIT=$UNIT_DIR/$UNIT_NAME
DROPIN_DIR=$UNIT_DIR/$UNIT_NAME.d
STATE=$ROOT/var/lib/edgecl
CACHE=$ROOT/var/cache/edgecl
VENV_DIR=$ROOT$VENV
CHANGED=0

# A group exists on the target: the staged root's /etc/group when --prefix has one, else this machine's.
have_group() {
    if [[ -n $ROOT && -f $ROOT/etc/group ]]; then
        grep -q "^$1:" "$ROOT/etc/group"
    else
        getent group "$1" >/dev/null 2>&1
    fi
}

# Hash of what the venv holds (every distribution's version, and edgecl's RECORD with its file hashes), so a
# rerun that installs nothing new does not restart the service.
venv_fingerprint() {
    [[ -x $VENV_DIR/bin/python ]] || { echo none; return 0; }
    "$VENV_DIR/bin/python" -I - <<'PY' 2>/dev/null || echo none
import hashlib
from importlib import metadata

digest = hashlib.sha256()
for line in sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()):
    digest.update(line.encode() + b"\n")
try:
    digest.update((metadata.distribution("edgecl").read_text("RECORD") or "").encode())
except metadata.PackageNotFoundError:
    pass
print(digest.hexdigest())
PY
}

# Write stdin to $1 with mode $2 unless the file already has exactly that content (keeps mtimes stable).
put_file() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        chmod "$mode" "$dest"
        return 0
    fi
    install -D -m "$mode" "$tmp" "$dest"
    rm -f "$tmp"
    CHANGED=1
    log "wrote $dest"
}

# Create a folder with a mode, and give it to the service user when we manage users.
make_dir() {
    local dir=$1 mode=$2 owner=${3:-}
    if [[ ! -d $dir ]]; then
        install -d -m "$mode" "$dir"
        log "created $dir"
    fi
    chmod "$mode" "$dir"
    if [[ -n $owner && $DO_SYSTEM -eq 1 ]]; then
        chown "$owner" "$dir"
    fi
}

detect_platform() {
    if [[ -e $ROOT/etc/nv_tegra_release ]]; then
        echo jetson
    elif command -v nvidia-smi >/dev/null 2>&1 || [[ -e /proc/driver/nvidia/version ]]; then
        echo x86
    else
        echo cpu
    fi
}

default_profile() {
    case "$1" in
        jetson) echo jetson-orin-nano-8gb ;;
        x86) echo x86-cuda ;;
        *) echo cpu ;;
    esac
}

uninstall() {
    if [[ $DO_SYSTEM -eq 1 ]] && command -v systemctl >/dev/null 2>&1; then
        if [[ -f $UNIT ]]; then
            systemctl disable --now "$UNIT_NAME" || log "systemctl disable failed; continuing"
        fi
    fi
    if [[ -d $DROPIN_DIR ]]; then
        rm -rf -- "$DROPIN_DIR"
        log "removed $DROPIN_DIR"
    fi
    if [[ -f $UNIT ]]; then
        rm -f -- "$UNIT"
        log "removed $UNIT"
    fi
    if [[ $DO_SYSTEM -eq 1 ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
    fi
    if [[ -f $VENV_DIR/pyvenv.cfg ]]; then
        rm -rf -- "$VENV_DIR"
        log "removed $VENV_DIR"
        if [[ $VENV == "$DEFAULT_VENV" ]]; then
            rmdir --ignore-fail-on-non-empty -- "$(dirname -- "$VENV_DIR")" 2>/dev/null || true
        fi
    elif [[ -e $VENV_DIR ]]; then
        log "left $VENV_DIR: it is not a virtual environment (no pyvenv.cfg)"
    fi
    if [[ -d $ETC ]]; then
        rm -rf -- "$ETC"
        log "removed $ETC (config, profiles, token)"
    fi
    if [[ $PURGE -eq 1 ]]; then
        rm -rf -- "$STATE" "$CACHE"
        log "removed $STATE and $CACHE"
        if [[ $DO_SYSTEM -eq 1 ]] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
            userdel "$SERVICE_USER"
            log "removed user $SERVICE_USER"
        fi
    elif [[ -d $STATE ]]; then
        log "kept $STATE (data); --uninstall --purge removes it"
    fi
    log "uninstalled"
}

if [[ $UNINSTALL -eq 1 ]]; then
    uninstall
    exit 0
fi

[[ -f $SRC/deploy/$UNIT_NAME && -f $SRC/deploy/edgecl.env.example ]] || die "run from an edgecl checkout"
[[ $PLATFORM != auto ]] || PLATFORM=$(detect_platform)
PROFILE=$(default_profile "$PLATFORM")
log "platform $PLATFORM, profile $PROFILE, venv $VENV_DIR, root ${ROOT:-/}"

# 1. Service user and groups. Only groups that exist are used: a missing SupplementaryGroups= entry makes
#    the unit fail to start (status=216/GROUP).
present_groups=()
for group in "${OPTIONAL_GROUPS[@]}"; do
    if have_group "$group"; then
        present_groups+=("$group")
    else
        case "$group" in
            jtop) log "group jtop missing: no jetson-stats service here; on a Jetson run" \
                      "'sudo pip3 install -U jetson-stats', reboot, then rerun install.sh" ;;
            *) log "group $group missing: the service runs without it" ;;
        esac
    fi
done
if [[ $DO_SYSTEM -eq 1 ]]; then
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/edgecl --no-create-home \
            --shell /usr/sbin/nologin --comment "edgecl daemon" "$SERVICE_USER"
        log "created system user $SERVICE_USER"
    fi
    for group in "${present_groups[@]}"; do
        if ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx "$group"; then
            usermod -a -G "$group" "$SERVICE_USER"
            log "added $SERVICE_USER to group $group"
        fi
    done
fi

# 2. Folders.
make_dir "$ETC" 0755
make_dir "$ETC/profiles" 0755
make_dir "$STATE" 0750 "$SERVICE_USER:$SERVICE_USER"
make_dir "$CACHE" 0750 "$SERVICE_USER:$SERVICE_USER"

# 3. Config: the env file is written once and never overwritten (it is the operator's file).
ENV_FILE=$ETC/edgecl.env
if [[ -e $ENV_FILE ]]; then
    log "kept $ENV_FILE (exists)"
else
    put_file "$ENV_FILE" 0640 < <(sed "s/^EDGECL_PROFILE=.*/EDGECL_PROFILE=$PROFILE/" "$SRC/deploy/edgecl.env.example")
fi
if [[ $DO_SYSTEM -eq 1 ]]; then
    chown "root:$SERVICE_USER" "$ENV_FILE"
fi

# Shipped profiles: a copy the operator edited is kept; the new version goes beside it as NAME.yaml.new.
for src_profile in "$SRC"/profiles/*.yaml; do
    dest=$ETC/profiles/$(basename -- "$src_profile")
    if [[ ! -e $dest ]]; then
        install -m 0644 "$src_profile" "$dest"
        log "wrote $dest"
    elif ! cmp -s "$src_profile" "$dest"; then
        if ! { [[ -e $dest.new ]] && cmp -s "$src_profile" "$dest.new"; }; then
            install -m 0644 "$src_profile" "$dest.new"
            log "kept edited $dest; the shipped version is in $dest.new"
        fi
    fi
done

# 4. Token: random, 0600, readable only by the service user; never replaced.
TOKEN_FILE=$ETC/token
if [[ ! -s $TOKEN_FILE ]]; then
    (
        umask 077
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE"
        printf '\n' >>"$TOKEN_FILE"
    )
    log "created $TOKEN_FILE (random bearer token)"
fi
chmod 0600 "$TOKEN_FILE"
if [[ $DO_SYSTEM -eq 1 ]]; then
    chown "$SERVICE_USER:$SERVICE_USER" "$TOKEN_FILE"
fi

# 5. Virtual environment and the edgecl package.
if [[ $DO_PIP -eq 1 ]]; then
    PYTHON=${PYTHON:-python3}
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install python3 (>= 3.10) and python3-venv"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "edgecl needs Python >= 3.10"
    pip_args=(install --no-cache-dir --upgrade-strategy only-if-needed)
    before=$(venv_fingerprint)
    if [[ $PLATFORM == jetson ]]; then
        if ! "$PYTHON" -c 'import torch, torchvision' 2>/dev/null; then
            die "no L4T PyTorch for $PYTHON: install the Jetson wheels first, e.g." \
                "sudo pip3 install --index-url https://pypi.jetson-ai-lab.io/jp6/cu126 torch==2.8.0" \
                "torchvision==0.23.0 (see the README, "Deploy on a Jetson Orin Nano"); PyPI's torch has no Jetson GPU support"
        fi
        [[ -f $VENV_DIR/pyvenv.cfg ]] || "$PYTHON" -m venv --system-site-packages "$VENV_DIR"
        # Pin what the system already has so pip cannot replace the L4T torch, keep NumPy 1.x when torch
        # runs on it, and keep the jetson-stats client at the version of the host's jtop service.
        constraints=$(mktemp)
        trap 'rm -f "$constraints"' EXIT
        "$VENV_DIR/bin/python" -I - >"$constraints" <<'PY'
from importlib import metadata


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


for dist in ("torch", "torchvision", "jetson-stats"):
    if version(dist):
        print(f"{dist}=={version(dist)}")
numpy = version("numpy")
if numpy and int(numpy.split(".")[0]) < 2:
    print("numpy<2")
PY
        "$VENV_DIR/bin/python" -m pip "${pip_args[@]}" -c "$constraints" "${SRC}[jetson]"
    else
        [[ -f $VENV_DIR/pyvenv.cfg ]] || "$PYTHON" -m venv "$VENV_DIR"
        "$VENV_DIR/bin/python" -m pip "${pip_args[@]}" -c "$SRC/constraints.txt" "$SRC"
    fi
    "$VENV_DIR/bin/edgecl" --help >/dev/null || die "$VENV_DIR/bin/edgecl does not run"
    if [[ $(venv_fingerprint) != "$before" ]]; then
        CHANGED=1
        log "edgecl installed in $VENV_DIR"
    else
        log "unchanged $VENV_DIR"
    fi
fi

# 6. Unit and its group drop-in.
# put_file reads from process substitutions, not pipes, so that it runs in this shell and CHANGED sticks.
put_file "$UNIT" 0644 < <(sed "s#^ExecStart=$DEFAULT_VENV/bin/edgecl #ExecStart=$VENV/bin/edgecl #" \
    "$SRC/deploy/$UNIT_NAME")
groups_dropin() {
    echo "# Written by deploy/install.sh: the supplementary groups that exist on this machine."
    echo "# Rerun install.sh after adding a group (e.g. jtop from jetson-stats)."
    echo "[Service]"
    echo "SupplementaryGroups="
    if [[ ${#present_groups[@]} -gt 0 ]]; then
        echo "SupplementaryGroups=${present_groups[*]}"
    fi
}
put_file "$DROPIN_DIR/10-groups.conf" 0644 < <(groups_dropin)

# 7. Enable and start.
if [[ $DO_SYSTEM -eq 1 ]]; then
    if [[ $CHANGED -eq 1 ]]; then
        systemctl daemon-reload
    fi
    if [[ $CHANGED -eq 1 ]] && systemctl is-active --quiet "$UNIT_NAME"; then
        systemctl restart "$UNIT_NAME"
        log "restarted $UNIT_NAME"
    fi
    systemctl enable --now "$UNIT_NAME"
    log "enabled $UNIT_NAME; check it with: systemctl status edgecl; sudo -u edgecl $VENV/bin/edgecl doctor"
else
    log "files staged under ${ROOT:-/}; systemctl not called"
fi
log "done"
