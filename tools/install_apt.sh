#!/usr/bin/env bash
# Install the Debian packages masksiam needs, only those that are missing (a second run does nothing).
#   dataset-fashion-mnist   the embedded default data (make demo)
#   opencv-doc, plasma-workspace-wallpapers, mate-backgrounds   real photos for the ImageNet-like folder
#   libopencv-dev libturbojpeg0-dev pkg-config   to build ffcv's C extension
set -euo pipefail
PACKAGES=(dataset-fashion-mnist opencv-doc plasma-workspace-wallpapers mate-backgrounds
          libopencv-dev libturbojpeg0-dev pkg-config)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
