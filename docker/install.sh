#!/bin/sh
# Builds the image's runtime virtual environment. The Dockerfile's build stage runs this script,
# and tests/deploy/test_image.py runs the very same script (Docker is not needed to test it):
#
#     sh docker/install.sh VENV WHEEL_DIR
#
# run in the build context (pyproject.toml, README.md, requirements.lock, bridge/). PYTHON names
# the interpreter that builds (default python3; it needs pip). The result, VENV, holds the locked
# runtime dependencies (requirements.lock, hashes checked, wheels only: nothing is compiled) and the
# bridge's wheel, and nothing else: no pip, no setuptools, no test tools.
set -eu
venv=${1:?usage: install.sh VENV WHEEL_DIR}
wheels=${2:?usage: install.sh VENV WHEEL_DIR}
py=${PYTHON:-python3}

"$py" -m venv --without-pip "$venv"
"$py" -m pip --python "$venv/bin/python" install --no-deps --require-hashes --only-binary=:all: \
    -r requirements.lock
"$py" -m pip wheel --no-deps --wheel-dir "$wheels" .
"$py" -m pip --python "$venv/bin/python" install --no-deps --no-index "$wheels"/epsignal_bridge-*.whl
