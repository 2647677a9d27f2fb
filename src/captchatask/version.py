"""The single source of the package version (read by hatch and by ``captchatask --version``)."""

__version__ = "0.1.0"
