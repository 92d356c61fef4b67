#!/bin/sh
# Read the secrets compose mounts under /run/secrets into the variables the programs expect, so no
# password is ever written into a URL, a command line or the image.
set -eu
export_secret() {  # export_secret VARIABLE FILE
    if [ -r "$2" ]; then
        value=$(cat "$2")
        export "$1=$value"
    fi
}
export_secret PGPASSWORD /run/secrets/pg_password
export_secret MLFLOW_AUTH_ADMIN_PASSWORD /run/secrets/mlflow_admin_password
export_secret MLFLOW_FLASK_SERVER_SECRET_KEY /run/secrets/mlflow_secret_key
export_secret MLFLOW_TRACKING_PASSWORD /run/secrets/mlflow_tracking_password
exec "$@"
