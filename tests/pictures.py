"""Block masks drawn as text, so that tests can state a pattern literally: one line per query block,
one character per key block, '#' = kept, '.' = skipped."""

import torch


def picture(text: str) -> torch.Tensor:
    """Bool (rows, cols) from a drawing; blank lines and surrounding spaces are ignored."""
    rows = [line.strip() for line in text.strip().splitlines() if line.strip()]
    assert len({len(row) for row in rows}) == 1, f"ragged picture: {rows}"
    assert set("".join(rows)) <= {"#", "."}, f"only '#' and '.' please: {rows}"
    return torch.tensor([[c == "#" for c in row] for row in rows], dtype=torch.bool)


def draw(blocks: torch.Tensor) -> str:
    """The drawing of a bool (rows, cols) mask (for failure messages)."""
    return "\n".join("".join("#" if x else "." for x in row) for row in blocks.tolist())
