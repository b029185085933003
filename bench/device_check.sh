#!/usr/bin/env bash
# The prepared GPU check (issue 15): the logic is in bench/device_check.py; docs/device_check.md.
#
#   bench/device_check.sh --prepare    here: wheels into .whl/, ETTh1.csv into .devdata/ (needs PyPI)
#   bench/device_check.sh --dry-run    here, on the CPU: check everything, print the device tool's run call
#   bench/device_check.sh              on the lent GPU machine, through that run call
#
# Here it runs under $PYTHON, else .venv/bin/python, else python3. There it runs under the image's
# python3, with the carried wheels installed into /tmp/site first (the image has no pydantic,
# optuna, xgrammar or bitsandbytes, and nothing can be downloaded there).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

case " $* " in
  *" --dry-run "* | *" --prepare "* | *" -h "* | *" --help "*)
    py="${PYTHON:-}"
    if [[ -z "$py" ]]; then
      if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
    fi
    exec "$py" bench/device_check.py "$@"
    ;;
esac

shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} == 0 )); then
  echo "device_check: no wheels in .whl/: prepare them here (--prepare) and name .whl in the run call's carry" >&2
  exit 2
fi
# --target keeps the image's own packages untouched; --no-deps: the dry run checked the set is complete.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
# The checkout goes on the path too: the device machine has no package index to build the
# project's editable install (pip install -e .) from, so the project is used from here as is.
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
exec python3 bench/device_check.py "$@"
