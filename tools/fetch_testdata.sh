#!/usr/bin/env bash
# Pillow's own test images (CMYK, progressive, truncated, EXIF-rotated JPEGs) for the odd-input tests.
# They ship only in Pillow's source distribution; fetched once from the package registry at install
# time into $1 (default .cache/testdata/pillow), never at run time.
set -euo pipefail
DEST=${1:-.cache/testdata/pillow}
VERSION=12.0.0
[ -f "$DEST/.complete" ] && exit 0
PY=${PY:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "pillow==$VERSION" -d "$tmp"
mkdir -p "$DEST"
tar -xzf "$tmp"/pillow-$VERSION.tar.gz -C "$tmp" --wildcards "pillow-$VERSION/Tests/images/*.jpg" "pillow-$VERSION/Tests/images/*.png"
find "$tmp/pillow-$VERSION/Tests/images" -maxdepth 1 -type f \( -name '*.jpg' -o -name '*.png' \) -size -2M -exec cp {} "$DEST/" \;
touch "$DEST/.complete"
echo "Pillow test images: $(ls "$DEST" | wc -l) files in $DEST"
