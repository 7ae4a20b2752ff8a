"""A progress line on stderr at log steps: a bar, each variant's loss, tokens/s, ETA.

Invariant: prints only host values it is handed; never touches tensors.
"""

from __future__ import annotations

import sys
import time

BAR = 24


class Progress:
    def __init__(self, total: int, *, enabled: bool = True, stream=None, main: bool = True):
        self.total, self.enabled = total, enabled
        self.main = main  # this process speaks for the run: stop messages print even when quiet
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.first_step: int | None = None

    def _print(self, text: str, final: bool = False, always: bool = False) -> None:
        if not (self.enabled or (always and self.main)):
            return
        try:
            if self.tty and not final:
                self.stream.write("\r" + text + "\x1b[K")
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed (a pipe's reader gone, a hung-up terminal)
            self.enabled = self.main = False  # the run goes on; its files are the record

    def update(self, step: int, metrics: dict[str, dict]) -> None:
        if self.first_step is None:
            self.first_step, self.t0 = step, time.perf_counter()
        filled = int(BAR * step / self.total)
        losses = " | ".join(f"{n} {m.get('loss/train', float('nan')):.3f}" for n, m in metrics.items())
        tps = sum(m.get("perf/tokens_per_s", 0.0) for m in metrics.values()) / max(len(metrics), 1)
        done = step - self.first_step
        eta = (time.perf_counter() - self.t0) / done * (self.total - step) if done else float("nan")
        eta_text = f"{eta:.0f}s" if eta == eta else "?"
        self._print(
            f"[{'#' * filled}{'.' * (BAR - filled)}] {step}/{self.total} | {losses} | "
            f"{tps / 1e3:.1f}k tok/s/variant | eta {eta_text}"
        )

    def note(self, text: str) -> None:
        self._print(f"  {text}", final=True)

    def warn(self, text: str) -> None:
        """A note that prints even under --quiet (this process speaks for the run)."""
        self._print(f"  warning: {text}", final=True, always=True)

    def note_eval(self, results: dict[str, dict]) -> None:
        text = " | ".join(f"{n} val {m['loss/val']:.4f}" for n, m in results.items())
        self._print(f"  eval: {text}", final=True)

    def finish(self, table: str, run_dir) -> None:
        self._print(f"\n{table}\n\nlogs: {run_dir}\n  tensorboard --logdir {run_dir.parent}", final=True)

    def stopped(self, signal_name: str, step: int, checkpoint, run_dir) -> None:
        self._print(
            f"\n{signal_name} received: finished step {step}, wrote {checkpoint}.\n"
            f"Resume with: fp8lab run <the same recipe and --set options> --resume {run_dir}",
            final=True,
            always=True,
        )

    def stopped_at_end(self, signal_name: str, run_dir) -> None:
        """A signal during the final checkpoint and summary, or after them."""
        self._print(
            f"\n{signal_name} received at the end of the run: the final checkpoint and summary.json were "
            f"completed first; the run is finished ({run_dir}).",
            final=True,
            always=True,
        )
