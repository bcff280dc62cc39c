"""Errors the user sees as one line: each carries the reason, never a traceback."""

import unicodedata


class TruforError(Exception):
    """Base of every error this package reports to the user."""


class ImageError(TruforError):
    """An input image cannot be analysed (missing, corrupt, too small, too large...)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class IncompleteImage(ImageError):
    """An image file that ends before its image does (empty, truncated): what a file still being
    written reads as, so `watch` tries it again while it is recent."""


class RunnerFailure(TruforError):
    """The runner itself can no longer infer (device lost, engine broken): no later image would
    fare better, so a batch stops with this reason instead of failing every image in turn."""


class OutputsUnwritable(RunnerFailure):
    """The output folder takes no more files (full, over quota, read-only): handled as a runner
    failure, since no later image could be written either; the batch stops at the first."""


class CheckpointError(TruforError):
    """A checkpoint file is not a usable TruFor checkpoint."""


class EngineError(TruforError):
    """A TensorRT engine or the CUDA layer cannot be built or used here, with what to do about it."""


def one_line(exc: BaseException) -> str:
    """Someone else's exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})  # line and paragraph separators
# Bidirectional controls: a right-to-left override turns "gpj.exe" into what reads "exe.jpg".
_CONTROL.update({code: f"\\u{code:04x}" for code in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                                                       *range(0x2066, 0x206A))})


def printable(text: str) -> str:
    """`text` with every control character written as an escape: a file name holding a newline
    cannot start a second, forged line in a log, nor a bidirectional control reorder what is shown.
    In a name that is not in Unicode's composed form (NFC), the combining characters are escaped
    too: two files whose names differ only in that form (macOS writes decomposed names) would
    otherwise show as one name twice."""
    shown = str(text).translate(_CONTROL)
    if unicodedata.is_normalized("NFC", shown):
        return shown
    return "".join(f"\\u{ord(char):04x}" if unicodedata.combining(char) or _is_jamo(char) else char
                   for char in shown)


def _is_jamo(char: str) -> bool:
    """A conjoining Hangul letter: what a decomposed Hangul syllable is written with."""
    return 0x1100 <= ord(char) <= 0x11FF
