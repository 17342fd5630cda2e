#!/usr/bin/env bash
# Runs a Python script on an emulated ARM64 Linux (qemu-user) with the aarch64 onnxruntime wheel from PyPI, so the
# kernels phones and Raspberry Pis run (onnxruntime's Arm CPU code, NEON) are exercised on this x86 machine:
#
#   bash scripts/arm64_emulated.sh scripts/bench_on_device.py EXPORT_FOLDER --parity-only --json result.json
#
# The first run installs qemu-user-static (Debian) and puts Debian's arm64 Python 3.11 and the aarch64 wheels of
# the onnxruntime and numpy versions installed here into $EDGESLIM_ARM64 (default ~/.cache/edgeslim/arm64).
# Needs root: apt, and a private mount namespace. onnxruntime's cpuinfo reads /proc/cpuinfo, which qemu-user leaves
# as the x86 host's (onnxruntime then crashes on import), so an arm64 one describing Cortex-A76 cores (Raspberry
# Pi 5, many phones) is bound over it for this command only. Slow: for parity, not speed.
set -euo pipefail
root="${EDGESLIM_ARM64:-$HOME/.cache/edgeslim/arm64}"
ort_version=$(python3 -c "import onnxruntime; print(onnxruntime.__version__)")
numpy_version=$(python3 -c "import numpy; print(numpy.__version__)")
if [ ! -f "$root/ready-$ort_version" ]; then
  command -v qemu-aarch64-static >/dev/null || apt-get install -y -qq --no-install-recommends qemu-user-static \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-user-static; }
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64 && apt-get update -qq; }
  rm -rf "$root" && mkdir -p "$root/debs" "$root/sysroot" "$root/site"
  (cd "$root/debs" && apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
    libpython3.11-stdlib:arm64 libc6:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 libssl3:arm64 \
    libstdc++6:arm64 libgcc-s1:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 \
    libncursesw6:arm64 libtinfo6:arm64 libcrypt1:arm64 2>/dev/null)
  for deb in "$root"/debs/*.deb; do dpkg -x "$deb" "$root/sysroot"; done
  python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 \
    "onnxruntime==$ort_version" "numpy==$numpy_version" -d "$root/wheels"
  for wheel in "$root"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$root/site"; done
  for i in 0 1; do printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"; done > "$root/cpuinfo"
  touch "$root/ready-$ort_version"
fi
exec unshare --mount -- bash -c 'mount --bind "$0/cpuinfo" /proc/cpuinfo && PYTHONPATH="$0/site" QEMU_CPU=cortex-a76 \
  exec qemu-aarch64-static -L "$0/sysroot" "$0/sysroot/usr/bin/python3.11" "$@"' "$root" "$@"
