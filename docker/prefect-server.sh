#!/bin/sh
# `prefect server start` as docker/compose.yaml runs it: Prefect's basic auth is on whenever
# PREFECT_SERVER_API_AUTH_STRING is set, and without it the server refuses to start when the API is
# published beyond loopback (SWIRL_API_BIND, the host address compose publishes port 4200 on).
set -eu
if [ -z "${PREFECT_SERVER_API_AUTH_STRING:-}" ]; then
  # Prefect reads an empty value as auth on with an empty credential, which no client can present.
  unset PREFECT_SERVER_API_AUTH_STRING
  case "${SWIRL_API_BIND:-127.0.0.1}" in
    127.*|localhost|::1) ;;
    *)
      echo "prefect-server: refusing to publish the Prefect API on ${SWIRL_API_BIND} without authentication:" \
           "set PREFECT_API_AUTH_STRING=user:password (docker/README.md)" >&2
      exit 64 ;;
  esac
fi
exec prefect server start "$@"
