"""What a command tells the world: the --json document, progress, GitHub Actions, quiet libraries.

No click here (the CLI translates flags and calls these), and nothing here runs a stage.
"""

from __future__ import annotations

from mergekit_lite.outcome.document import FORMAT, VERDICTS, Outcome, release_digest

__all__ = ["FORMAT", "VERDICTS", "Outcome", "release_digest"]
