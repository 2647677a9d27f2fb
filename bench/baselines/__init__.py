"""The designs we measure ourselves against, run side by side on the same machine."""
