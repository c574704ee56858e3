#!/usr/bin/env bash
# Create the separate AppWorld venv (appworld pins pydantic<2, so it cannot share sgcd_jax's env) and
# check for its data. Usage:
#   APPWORLD_VENV=~/.venvs/appworld APPWORLD_ROOT=~/appworld bash launch/appworld_setup.sh
# Then train/eval with env.name=appworld; sgcd_jax starts `$APPWORLD_VENV/bin/appworld serve environment`
# processes itself (one task per process).
set -euo pipefail

APPWORLD_VERSION="${APPWORLD_VERSION:-0.1.3.post1}"
APPWORLD_VENV="${APPWORLD_VENV:-$HOME/.venvs/appworld}"
APPWORLD_ROOT="${APPWORLD_ROOT:-$HOME/appworld}"
PYTHON="${PYTHON:-python3.11}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; appworld needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [[ ! -x "$APPWORLD_VENV/bin/appworld" ]]; then
  echo "creating AppWorld venv at $APPWORLD_VENV (appworld==$APPWORLD_VERSION)"
  "$PYTHON" -m venv "$APPWORLD_VENV"
  "$APPWORLD_VENV/bin/pip" install --quiet --upgrade pip
  "$APPWORLD_VENV/bin/pip" install --quiet "appworld==$APPWORLD_VERSION"
fi

mkdir -p "$APPWORLD_ROOT"
# Unpacks the bundled (encrypted) app sources; needs no internet.
(cd "$APPWORLD_ROOT" && APPWORLD_ROOT="$APPWORLD_ROOT" "$APPWORLD_VENV/bin/appworld" install)

if [[ ! -d "$APPWORLD_ROOT/data/tasks" ]]; then
  cat >&2 <<MSG
AppWorld data not found at $APPWORLD_ROOT/data.
Run \`appworld download data\` where there is internet:
  APPWORLD_ROOT=$APPWORLD_ROOT $APPWORLD_VENV/bin/appworld download data
(or copy a downloaded data/ folder there), then: export APPWORLD_ROOT=$APPWORLD_ROOT
MSG
  exit 2
fi

"$APPWORLD_VENV/bin/python" -c "import appworld, pydantic; print('appworld', appworld.__version__, 'pydantic', pydantic.VERSION)"
echo "AppWorld ready: export APPWORLD_VENV=$APPWORLD_VENV APPWORLD_ROOT=$APPWORLD_ROOT"
