#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages streamd's demo and tests need, if they are missing:
# FFmpeg (to make clips), GStreamer's RTSP server with Python bindings (the test cameras), and
# the Mosquitto and Redis servers the broker-output tests start, and Chromium (the live view's
# test loads the page headless), and libGL for the GUI build of OpenCV that the `tracking`
# extra's ByteTrack library brings (it shares cv2 with the headless build). The daemon itself needs none; its
# child-process decoders (sources.decoder: ffmpeg | gstreamer) run ffmpeg or gst-launch-1.0.
set -euo pipefail

pkgs=(ffmpeg gstreamer1.0-tools python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
      gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav mosquitto redis-server chromium
      libgl1)

have_all() {
  command -v ffmpeg >/dev/null 2>&1 || return 1
  command -v gst-launch-1.0 >/dev/null 2>&1 || return 1
  # Debian installs the brokers' binaries in sbin/bin; the tests start their own instances.
  [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || return 1
  command -v redis-server >/dev/null 2>&1 || return 1
  command -v chromium >/dev/null 2>&1 || return 1
  ldconfig -p 2>/dev/null | grep -q 'libGL\.so\.1' || return 1
  /usr/bin/python3 - <<'PY' >/dev/null 2>&1 || return 1
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
for name in ("x264enc", "rtph264pay", "x265enc", "rtph265pay", "jpegdec", "h264parse", "multifilesrc"):
    assert Gst.ElementFactory.find(name), name
PY
}

if have_all; then
  echo "system packages: present"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages and no apt-get; install: ${pkgs[*]}" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "installing system packages: ${pkgs[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
have_all || { echo "system packages installed but the GStreamer RTSP server still does not load" >&2; exit 1; }
