"""JSON-lines training logs and loss/AP curves (PNG, matplotlib Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["RunLog", "plot_curves"]


class RunLog:
    """Appends one JSON object per line to ``<output_dir>/log.jsonl``.

    Records carry a ``"kind"``: ``"train"`` (step losses), ``"eval"`` (COCO stats) or
    ``"event"`` (start, resume, stage change). Only the main process should write.

    Args:
        path: the log file (created with its folder; appended to on resume).
        enabled: False makes every method a no-op (non-main ranks).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.engine.run_log import RunLog
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     log = RunLog(Path(tmp) / "log.jsonl")
        ...     log.write("train", step=1, loss=2.5)
        ...     log.write("eval", epoch=1, AP=float("nan"))
        ...     records = log.read()
        >>> records
        [{'kind': 'train', 'step': 1, 'loss': 2.5}, {'kind': 'eval', 'epoch': 1, 'AP': None}]
        >>> RunLog(Path("unused") / "log.jsonl", enabled=False).read()
        []
        >>> with tempfile.TemporaryDirectory() as tmp:   # a run killed mid-line, then resumed
        ...     _ = (Path(tmp) / "log.jsonl").write_text('{"kind": "train", "step": 1}\\n{"kind": "tra')
        ...     log = RunLog(Path(tmp) / "log.jsonl")
        ...     log.write("event", event="resume")
        ...     [record["kind"] for record in log.read()]
        ['train', 'event']
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields) -> None:
        """Appends ``{"kind": kind, **fields}`` (non-finite floats become null)."""
        if not self.enabled:
            return
        record = {"kind": kind}
        for key, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value
        with self.path.open("ab") as handle:
            # A killed run can leave a partial last line: start on a fresh line so records never merge.
            if handle.tell() > 0 and not self._ends_with_newline():
                handle.write(b"\n")
            handle.write((json.dumps(record) + "\n").encode())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, 2)
            return handle.read(1) == b"\n"

    def read(self) -> list[dict]:
        """All records written so far (a partial line left by a killed run is skipped)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


def plot_curves(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Draws the training loss per step and the AP / AP50 per epoch of a ``log.jsonl``.

    Args:
        log_path: a ``log.jsonl`` written by :class:`RunLog`.
        png_path: the image to write (its folder is created).

    Returns:
        ``png_path``, or None when the log has no training records.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.engine.run_log import RunLog, plot_curves
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     log = RunLog(Path(tmp) / "log.jsonl")
        ...     for step in range(1, 4):
        ...         log.write("train", epoch=0, step=step, loss=1.0 / step)
        ...     log.write("eval", epoch=1, AP=0.1, AP50=0.3)
        ...     png = plot_curves(log.path, Path(tmp) / "curves.png")
        ...     print(png.name, png.stat().st_size > 0)
        curves.png True
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = RunLog(log_path, enabled=False).read()
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[0].grid(alpha=0.3)
    if evals:
        axes[1].plot([r["epoch"] for r in evals], [r["AP"] for r in evals], "o-", label="AP")
        axes[1].plot([r["epoch"] for r in evals], [r["AP50"] for r in evals], "s-", label="AP50")
        axes[1].legend()
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("COCO AP")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    from qdetr.atomic_write import atomic_path

    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return png_path
