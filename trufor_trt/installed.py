"""Installed versions of the packages a report names, read from their metadata (never imported:
a broken or heavy package costs nothing here)."""

from importlib import metadata


def distribution_versions(names) -> dict:
    """Distribution name -> its installed version, or None where it is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
