# Services the tests talk to. Sourced by scripts/test (and other scripts).
# Each service is provisioned only when its variable is unset; what this file
# starts, services_stop stops.

SERVICES_STARTED=()

services_start() {
  :
}

services_stop() {
  local pid
  for pid in "${SERVICES_STARTED[@]:-}"; do
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
