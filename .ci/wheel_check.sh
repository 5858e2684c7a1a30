#!/usr/bin/env bash
# The package as a user installs it: build a wheel from this checkout, install it with the
# versions of constraints.txt into a fresh virtualenv without TensorFlow (no `build` extra), and
# check, from a directory that is not the checkout, that it carries its configs and data files
# and that the `m2net` command finds a packaged config. .ci/run calls it; it runs on its own too:
#   .ci/wheel_check.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/m2net-wheel.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
unset PYTHONPATH  # the checkout must not be importable: everything comes from the wheel

# The files a commit would hold (tracked and new, not ignored), so that no stale build/ output of
# the checkout ends up in the wheel.
mkdir "$tmp/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 tar --ignore-failed-read -cf - --) | tar -xf - -C "$tmp/src"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$tmp/dist" "$tmp/src"

python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet -c "$repo/constraints.txt" "$tmp"/dist/*.whl
export PATH="$tmp/venv/bin:$PATH"
mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"

echo "wheel check: installed $(basename "$tmp"/dist/*.whl) without TensorFlow"
python - <<'EOF'
import importlib.resources
import importlib.util
import os

import m2net_jax
from m2net_jax import configs

assert importlib.util.find_spec("tensorflow") is None, "the core install pulled in TensorFlow"
assert "site-packages" in m2net_jax.__file__, f"m2net_jax imported from {m2net_jax.__file__}"
assert importlib.resources.files("m2net_jax.data").joinpath("cities.csv").is_file()
expected = [f"m2net_jax/configs/{n}.py" for n in ("quickstart", "r29", "r47", "r65")]
assert configs.shipped() == expected, configs.shipped()
for spec in (*expected, "m2net_jax/configs/r47.py:smoke", "m2net_jax/configs/r65.py:geo_twins"):
    configs.load(spec)  # found from another directory; imports m2net_jax.configs.base
assert configs.load("m2net_jax/configs/r47.py:smoke").data.dataset == "geo_twins/smoke"
print(f"wheel check: {len(expected)} configs load from {os.getcwd()}")
EOF

# `m2net` parses --config and its overrides, then --helpfull prints them (absl exits 1 after
# help): the override's default is the smoke variant's batch size, so that variant was loaded.
help="$(m2net --config=m2net_jax/configs/r47.py:smoke --config.stages.pretrain.batch_size=8 \
  --workdir="$tmp/w" --helpfull 2>&1 || true)"
if ! grep -A3 -- '--config.stages.pretrain.batch_size:' <<<"$help" | grep -q "(default: '16')"; then
  echo "wheel check: m2net did not load m2net_jax/configs/r47.py:smoke:" >&2
  echo "$help" | tail -20 >&2
  exit 1
fi
if missing="$(m2net --config=configs/r47.py --workdir="$tmp/w" 2>&1)" ||
  ! grep -q "Shipped configs: m2net_jax/configs/quickstart.py" <<<"$missing"; then
  echo "wheel check: a missing config did not fail with the shipped configs listed:" >&2
  echo "$missing" >&2
  exit 1
fi
echo "wheel check: m2net --config finds the packaged configs; a missing one lists them"

# Train and evaluate the smoke variant from the wheel, TensorFlow absent: build the dataset
# first (m2net-build), then the three stages (ResNet-29, one epoch each; about a minute).
m2net-build --dataset=geo_twins/smoke --data_dir="$tmp/tfds" 2>"$tmp/build.log" ||
  { tail -20 "$tmp/build.log" >&2; exit 1; }
if ! m2net --config=m2net_jax/configs/r47.py:smoke --config.recognizer.depth=29 \
  --config.data.data_dir="$tmp/tfds" --config.data.build_if_missing=False \
  --workdir="$tmp/train" >"$tmp/train.out" 2>"$tmp/train.log"; then
  echo "wheel check: training the smoke config from the wheel failed:" >&2
  tail -30 "$tmp/train.log" >&2
  exit 1
fi
grep -q "^finetune " "$tmp/train.out" || { cat "$tmp/train.out" >&2; exit 1; }
echo "wheel check: the smoke config trained and evaluated from the wheel without TensorFlow"
