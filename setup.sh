#!/usr/bin/env bash
# Set up kdd-mlflow in ./.venv. Usage: bash setup.sh [--dev]
#   --dev  also installs the test tools and the Debian packages the tests use.
# As root with apt, it installs Debian's dataset-fashion-mnist (the real Fashion-MNIST, offline).
set -euo pipefail
cd "$(dirname "$0")"

dev=0
[ "${1:-}" = "--dev" ] && dev=1

apt_packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_packages+=(dataset-fashion-mnist)
# The UI test drives Debian's Chromium through its chromedriver; the team-server tests start their own
# PostgreSQL cluster from Debian's server binaries; the docker/ check validates the compose file with
# Debian's docker-compose (no engine needed).
if [ $dev = 1 ]; then
    command -v chromium >/dev/null || apt_packages+=(chromium)
    command -v chromedriver >/dev/null || apt_packages+=(chromium-driver)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_packages+=(postgresql)
    command -v docker-compose >/dev/null || apt_packages+=(docker-compose)
    # a one-node Slurm cluster for the backend tests (the tests start and stop it; nothing is enabled)
    for tool in slurmctld slurmd munged; do
        [ -x "/usr/sbin/$tool" ] || { apt_packages+=(slurmctld slurmd slurm-client munge); break; }
    done
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ${#apt_packages[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${apt_packages[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
# A first install downloads PyTorch with its CUDA libraries (about 6.5 GB in .venv, plus pip's build
# space): refuse at once, with one line, rather than fail half-way with ENOSPC.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    need_kb=$((8 * 1024 * 1024))
    for dir in . "${TMPDIR:-/tmp}"; do
        free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
        if [ "$free_kb" -lt "$need_kb" ]; then
            echo "setup: needs about 8 GB free for PyTorch; $dir has $((free_kb / 1024)) MB free" >&2
            exit 1
        fi
    done
fi
extra=""
[ $dev = 1 ] && extra="[dev]"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extra"
.venv/bin/python -c "import kdd_mlflow, torch, torchvision, mlflow; print('setup: ready (torch', torch.__version__, '| mlflow', mlflow.__version__ + ')')"
