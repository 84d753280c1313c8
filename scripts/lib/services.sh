# Services the tests talk to. Sourced by scripts/test (and other scripts).
# A service is provisioned only when its variable is unset; what this file
# starts, services_stop stops.

SERVICES_STARTED=()

log() { printf '    %s\n' "$*"; }

# PostgreSQL: DATABASE_URL, or the machine's server on 127.0.0.1:5432 (started if
# it is installed but down), or a throwaway cluster of our own.
postgres_start() {
  if [ -n "${DATABASE_URL:-}" ]; then
    log "PostgreSQL: using DATABASE_URL"
    return
  fi
  if ! command -v pg_isready >/dev/null 2>&1; then
    log "PostgreSQL: not installed; installing it with apt-get"
    apt-get install -y -qq postgresql >/dev/null
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$version" ] && command -v pg_ctlcluster >/dev/null 2>&1; then
      log "PostgreSQL: starting cluster $version/main"
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    fi
  fi
  if pg_isready -q -h 127.0.0.1 -p 5432 \
      && psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    log "PostgreSQL: $DATABASE_URL"
    return
  fi
  # Our own cluster on a free port, owned by the postgres user (the server
  # refuses to run as root).
  local bin port dir
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  port=$(free_port)
  dir=$(mktemp -d /tmp/tasker-pg.XXXXXX)
  chown postgres "$dir"
  runuser -u postgres -- "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -l "$dir/log" -w start >/dev/null
  SERVICES_STARTED+=("pg:$bin:$dir")
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  log "PostgreSQL: started a private cluster at $DATABASE_URL"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# A Kafka-protocol broker: TASKER_KAFKA_BROKERS, or Nisshi (built with the nightly
# toolchain and cached in ~/.cargo/bin; Tansu as a fallback) on a free loopback
# port with memory storage. See ../shared/KAFKA.md for why these brokers.
kafka_install() {
  if command -v nisshi >/dev/null 2>&1 || command -v tansu >/dev/null 2>&1; then
    return
  fi
  if cargo +nightly --version >/dev/null 2>&1; then
    log "Kafka: installing the Nisshi broker (cargo +nightly install; ~13 min the first time)"
    cargo +nightly install nisshi --version 0.8.1 --locked >/dev/null 2>&1 \
      || cargo +nightly install nisshi --version 0.8.1 --locked
  else
    log "Kafka: no nightly toolchain; installing the Tansu broker instead (~10 min)"
    cargo install tansu --version 0.6.0 --locked --features libsql
  fi
}

kafka_start() {
  if [ -n "${TASKER_KAFKA_BROKERS:-}" ]; then
    log "Kafka: using TASKER_KAFKA_BROKERS=$TASKER_KAFKA_BROKERS"
    return
  fi
  kafka_install
  local port dir pid bin storage
  port=$(free_port)
  dir=$(mktemp -d /tmp/tasker-kafka.XXXXXX)
  if command -v nisshi >/dev/null 2>&1; then
    bin=nisshi; storage="memory://nisshi/"
  else
    bin=tansu; storage="sqlite://$dir/tansu.db"
  fi
  (cd "$dir" && exec "$bin" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "$storage" \
      --group-initial-rebalance-delay 0s >"$dir/broker.log" 2>&1) &
  pid=$!
  SERVICES_STARTED+=("pid:$pid")
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the $bin broker exited:"; cat "$dir/broker.log"; return 1
    fi
    if "$bin" topic list --broker "tcp://127.0.0.1:$port" >/dev/null 2>&1; then
      break
    fi
    sleep 0.1
  done
  if [ "$bin" = tansu ]; then
    python3 - "$dir/tansu.db" <<'PY'
import sqlite3, sys
sqlite3.connect(sys.argv[1]).execute("create index if not exists header_tp_off on header(topition, offset_id)")
PY
  fi
  export TASKER_KAFKA_BROKERS="127.0.0.1:$port"
  export TASKER_KAFKA_BROKER_BIN="$(command -v "$bin")"
  log "Kafka: $bin broker at $TASKER_KAFKA_BROKERS (pid $pid)"
}

services_start() {
  postgres_start
  kafka_start
}

services_stop() {
  local entry
  for entry in "${SERVICES_STARTED[@]:-}"; do
    [ -n "$entry" ] || continue
    case "$entry" in
      pg:*)
        local rest bin dir
        rest=${entry#pg:}; bin=${rest%%:*}; dir=${rest#*:}
        runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
        rm -rf "$dir"
        ;;
      pid:*)
        local pid=${entry#pid:}
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        ;;
    esac
  done
}
