"""Errors the user sees as one line: each carries the reason, never a traceback."""


class TruforError(Exception):
    """Base of every error this package reports to the user."""


class ImageError(TruforError):
    """An input image cannot be analysed (missing, corrupt, too small, too large...)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class RunnerFailure(TruforError):
    """The runner itself can no longer infer (device lost, engine broken): no later image would
    fare better, so a batch stops with this reason instead of failing every image in turn."""


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
    cannot start a second, forged line in a log, nor a bidirectional control reorder what is shown."""
    return str(text).translate(_CONTROL)
