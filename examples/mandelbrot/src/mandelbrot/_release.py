"""Release identity: version and default palette.

The checked-in values are those of the newest release. build-wheels.sh rewrites this
file in a scratch copy of the tree to build each release (see README.md).
"""

__version__ = "1.1.0"
PALETTE = "ember"
