"""trufor-trt: TruFor image forgery detection and localization, exported and run fast and faithfully."""

__version__ = "0.2.0"
