"""The training stream: numbered chunks of synthetic clips, made here or by worker processes.

Chunk `index` of a run with `seed` holds clips whose captions and seeds derive from (seed, index) alone, so
any process can make it, the stream is the same with or without workers, and a resumed run goes on where
it stopped. This module needs no torch: a worker process imports only numpy and scipy.

Workers hand their chunks over as files: what goes back through the pool's pipe is only the file's path, a
message short enough to be written in one atomic pipe write. A worker killed at any moment (by the
out-of-memory killer, or by `close`) cannot leave half a result in the pipe, which would block the pool's
reader thread for good (and the interpreter's exit with it); the pool sees the worker's death instead.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from demo_model import corpus

# How long `ClipStream.get` waits for the chunk at the head of the queue. A chunk of 64 clips takes a
# worker seconds; this only turns a stuck worker into an error instead of a hang.
CHUNK_TIMEOUT_S = 600.0


def synthesize_chunk(seed: int, index: int, size: int) -> tuple[np.ndarray, list[str]]:
    """Chunk `index` of the training stream: `size` clips (audio (size, 1, samples), captions)."""
    captions = corpus.CaptionSampler(seed=[seed, index])
    return corpus.training_batch(captions, size, np.random.default_rng([seed, index, 1]))


def _chunk_to_file(folder: str, seed: int, index: int, size: int) -> str:
    """In a worker: chunk `index` saved as an .npz in `folder`; returns its path."""
    audio, captions = synthesize_chunk(seed, index, size)
    path = os.path.join(folder, f"chunk-{index}.npz")
    np.savez(path, audio=audio, captions=np.array(captions))
    return path


def _chunk_from_file(path: str) -> tuple[np.ndarray, list[str]]:
    with np.load(path) as saved:
        chunk = saved["audio"], saved["captions"].tolist()
    os.remove(path)
    return chunk


class ClipStream:
    """The training stream's chunks, in order from `first_chunk`: made on demand in this process
    (`workers` 0), or ahead of time, 2 per worker, by `workers` processes.

    A worker that dies makes `get` raise `BrokenProcessPool`; one that makes no chunk for `timeout_s`
    makes it raise RuntimeError. Use it as a context manager (or call `close`) to stop the workers.
    """

    def __init__(self, seed: int, chunk_size: int, first_chunk: int, workers: int,
                 timeout_s: float = CHUNK_TIMEOUT_S):
        self.seed, self.chunk_size, self.next_chunk, self.timeout_s = seed, chunk_size, first_chunk, timeout_s
        # spawned, not forked: a fork copies whatever lock another thread holds (a test suite's app server,
        # torch's thread pool), and a worker that needs it hangs
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if workers else None)
        self.folder = tempfile.mkdtemp(prefix="clip-stream-") if workers else None
        self.pending: collections.deque = collections.deque()
        self.submitted, self.depth = first_chunk, 2 * workers  # chunks asked for; how many ahead
        self._top_up()

    def _top_up(self) -> None:
        while len(self.pending) < self.depth:
            self.pending.append(self.pool.submit(_chunk_to_file, self.folder, self.seed, self.submitted,
                                                 self.chunk_size))
            self.submitted += 1

    def get(self, wait: bool = True) -> tuple[np.ndarray, list[str]] | None:
        """The next chunk (audio (n, 1, samples), captions), or None if `wait` is False and it is not made yet."""
        if self.pool is None:
            chunk = synthesize_chunk(self.seed, self.next_chunk, self.chunk_size)
        elif not wait and not self.pending[0].done():
            return None
        else:
            try:
                chunk = _chunk_from_file(self.pending[0].result(timeout=self.timeout_s))
            except FutureTimeout:
                raise RuntimeError(f"no chunk from the clip workers in {self.timeout_s:.0f} s (chunk "
                                   f"{self.next_chunk}); the machine may be overloaded: try fewer --workers, "
                                   f"or --workers 0 to make the clips in the training process") from None
            self.pending.popleft()
            self._top_up()
        self.next_chunk += 1
        return chunk

    def close(self) -> None:
        """Cancel the chunks not made yet, stop the workers (without waiting for the chunks being made) and
        delete the chunk files."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        processes = list((getattr(pool, "_processes", None) or {}).values())  # as 3.14's terminate_workers
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
        self.pending.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ClipStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
