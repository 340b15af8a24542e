"""Summaries of py-spy "raw" (collapsed stack) profiles: where the samples went.

A raw profile has one line per distinct stack, `frame;frame;...;frame COUNT`, outermost
first, each frame `function (file:line)` (py-spy's `--format raw`). `summarize` prints the
functions with the most samples on top of the stack (self) and the most samples anywhere
in the stack (inclusive), and the share of samples that were idle in the event loop's
selector (the process waiting for I/O).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

__all__ = ["summarize"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        if "/relay/" in path:
            path = "relay/" + path.split("/relay/", 1)[1]
    return f"{match['func']} ({path})"


def summarize(raw: Path, top: int = 15) -> str:
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if leaf.startswith(("select (", "poll (", "epoll")) or "selectors.py" in leaf:
            idle += count
        self_counts[leaf] += count
        for name in set(frames):
            incl_counts[name] += count
    if total == 0:
        return f"{raw.name}: no samples\n"
    out = [f"{raw.name}: {total} samples, {100 * idle / total:.0f}% idle in the selector"]
    out.append("  self (top of stack):")
    for name, count in self_counts.most_common(top):
        out.append(f"    {100 * count / total:5.1f}%  {name}")
    out.append("  inclusive, relay/ functions:")
    relay_incl = [(n, c) for n, c in incl_counts.most_common() if "(relay/" in n]
    for name, count in relay_incl[:top]:
        out.append(f"    {100 * count / total:5.1f}%  {name}")
    return "\n".join(out) + "\n"
