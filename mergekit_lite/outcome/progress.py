"""Progress: a bar on a terminal, a few plain lines in a log, nothing when asked for quiet.

A CI log is not a terminal: carriage-return bars become thousands of lines there. So bars are
drawn only when the stream is a terminal and neither `TQDM_DISABLE` nor `CI` is set, unless
`--progress` / `--no-progress` says otherwise; in a log a line is printed at every tenth of the
work instead, so that a long merge is never a silent stretch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TextIO

from mergekit_lite.sizes import human_bytes

_OFF = {"", "0", "false", "no", "off"}


def bars_wanted(choice: bool | None, stream: TextIO, env: Mapping[str, str]) -> bool:
    """Whether to draw bars on `stream`: the flag if given, else a terminal outside CI and TQDM_DISABLE."""
    if choice is not None:
        return choice
    if env.get("TQDM_DISABLE", "").strip().lower() not in _OFF or env.get("CI", "").strip().lower() not in _OFF:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ByteProgress:
    """Bytes (or another `unit`: `tokens`) done of a known total: a tqdm bar, or a line per tenth,
    or nothing (`mode`)."""

    def __init__(self, total: int, desc: str, stream: TextIO, mode: str, unit: str = "B") -> None:
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode `{mode}`")
        self.total, self.desc, self.stream, self.mode = max(total, 1), desc, stream, mode
        self.unit = unit
        self.done = 0
        self._tenths = 0
        self._began = time.monotonic()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, file=stream, disable=False)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        elif self.mode == "lines":
            tenths = min(10, self.done * 10 // self.total)
            if tenths > self._tenths:
                self._tenths = tenths
                seconds = time.monotonic() - self._began
                print(
                    f"{self.desc}: {10 * tenths}% ({self._amount(min(self.done, self.total))}, {seconds:.1f} s)",
                    file=self.stream,
                    flush=True,
                )

    def _amount(self, done: int) -> str:
        """`1.2 MB of 3.4 MB`, or `120 of 340 tokens`."""
        if self.unit == "B":
            return f"{human_bytes(done)} of {human_bytes(self.total)}"
        return f"{done} of {self.total} {self.unit}"

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
