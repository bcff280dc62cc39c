"""Host memory of this process (Linux: /proc/self/status; elsewhere getrusage's peak)."""

import resource
import sys


def _status_field(name: str):
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since it started."""
    peak = _status_field("VmHWM")
    if peak is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    return peak


def rss_bytes():
    return _status_field("VmRSS")
