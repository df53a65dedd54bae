"""Blinding on disk: nothing a browser can see may tell the conditions of a study apart.

- File names are HMAC-SHA256 of the stimulus key under a per-study secret: opaque to raters, yet the same
  on every rebuild (the secret is created once and never served).
- Every WAV carries a fixed-size RIFF `JUNK` chunk of HMAC-derived bytes, so two stimuli never share bytes
  (MUSHRA's hidden reference is the open reference's audio) while all files of a study keep one size.
- Every file gets the study's creation time as mtime: Gradio's ETag is md5(mtime-size) and Last-Modified is
  the mtime, so neither may reveal the order files were written in.
- Per-rater randomness is seeded from the same secret: a reload shows a rater the same list.
- What a rater downloads is a per-rater copy (`presented_copy`): its URL token, its JUNK bytes and a TPDF
  dither of one least significant bit all come from HMAC(secret, rater, page, label), so two raters never
  share a URL and no two files of one page are byte-identical (the hidden reference differs from the open
  one in its samples, not only in padding), while nobody without the secret can recompute any of it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
import struct
import tempfile
from pathlib import Path

import numpy as np

SECRET_FILE = "secret"
JUNK_SIZE = 64  # bytes of the JUNK chunk payload (even, as RIFF chunks must be)
NAME_CHARS = 24  # hex characters of a stimulus name (96 bits)


def ensure_secret(study_dir: Path) -> bytes:
    """The study's secret, created on first use (exclusive create: concurrent callers agree on one)."""
    path = Path(study_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(study_dir)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    return read_secret(study_dir)


def read_secret(study_dir: Path) -> bytes:
    path = Path(study_dir) / SECRET_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ValueError(f"The study's secret is missing ({path}): stimulus names and rater assignments cannot "
                         "be reproduced without it. Restore it from a backup, or rebuild under a new study_id.") \
            from None
    if len(text) < 32:
        raise ValueError(f"The study's secret {path} is damaged (too short).")
    return text.encode()


def digest(secret: bytes, purpose: str, *parts: object) -> bytes:
    """HMAC-SHA256 of `parts` for one `purpose` (names, junk, trial ids and rater seeds never collide)."""
    message = "\x1f".join([purpose, *map(str, parts)]).encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def opaque_id(secret: bytes, purpose: str, *parts: object, length: int = 16) -> str:
    return digest(secret, purpose, *parts).hex()[:length]


def stimulus_name(secret: bytes, key: str) -> str:
    """The file name of a stimulus: reveals nothing, yet is the same on every rebuild."""
    return opaque_id(secret, "stimulus", key, length=NAME_CHARS) + ".wav"


def rater_seed(secret: bytes, rater_id: str) -> int:
    return int.from_bytes(digest(secret, "rater", rater_id)[:8], "big")


def audio_token(secret: bytes, rater_id: str, page: str, label: str) -> str:
    """The URL token of one clip as one rater receives it on one page (128 bits: not guessable)."""
    return opaque_id(secret, "audio", rater_id, page, label, length=32)


def rater_rng(secret: bytes, purpose: str, rater_id: str) -> random.Random:
    """A random generator only the server can reproduce: seeded from the secret, one purpose and the rater."""
    return random.Random(int.from_bytes(digest(secret, purpose, rater_id)[:8], "big"))


def presented_copy(wav: bytes, secret: bytes, *key: object) -> bytes:
    """`wav` (RIFF with JUNK and 16-bit data chunks) as one rater receives it: a JUNK payload and a TPDF dither
    (each sample moved by -1, 0 or +1 LSB, probabilities 1/4, 1/2, 1/4) derived from `key`. About -101 dBFS of
    noise: inaudible, yet a page's hidden and open reference differ in their samples. Same size as `wav`."""
    copy = bytearray(wav)
    for chunk, start, size in wav_chunks(wav):
        if chunk == b"JUNK":
            copy[start:start + size] = junk_bytes(secret, "\x1f".join(map(str, key)), size)
        elif chunk == b"data":
            pcm = np.frombuffer(wav, dtype="<i2", count=size // 2, offset=start).astype(np.int32)
            rng = np.random.default_rng(int.from_bytes(digest(secret, "dither", *key)[:8], "big"))
            noise = rng.integers(0, 2, pcm.size, dtype=np.int32) + rng.integers(0, 2, pcm.size, dtype=np.int32) - 1
            copy[start:start + pcm.size * 2] = np.clip(pcm + noise, -32768, 32767).astype("<i2").tobytes()
    return bytes(copy)


def wav_chunks(wav: bytes) -> list[tuple[bytes, int, int]]:
    """(chunk id, payload offset, payload size) of every chunk of a RIFF/WAVE file; ValueError if malformed."""
    if len(wav) < 12 or wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise ValueError("Not a RIFF/WAVE file.")
    chunks, offset = [], 12
    while offset + 8 <= len(wav):
        chunk, size = wav[offset:offset + 4], struct.unpack("<I", wav[offset + 4:offset + 8])[0]
        if offset + 8 + size > len(wav):
            raise ValueError(f"The WAV chunk {chunk!r} runs past the end of the file.")
        chunks.append((chunk, offset + 8, size))
        offset += 8 + size + size % 2
    return chunks


def junk_bytes(secret: bytes, key: str, size: int = JUNK_SIZE) -> bytes:
    """`size` random-looking bytes for `key` (HMAC in counter mode)."""
    blocks = [digest(secret, "junk", key, counter) for counter in range(-(-size // 32))]
    return b"".join(blocks)[:size]


def wav_bytes(audio: np.ndarray, sample_rate: int, junk: bytes) -> bytes:
    """(channels, samples) float audio in [-1, 1] as a 16-bit PCM WAV: RIFF, fmt, JUNK(junk), data.

    The JUNK chunk sits after fmt, so readers that expect fmt first (browsers, libsndfile) skip it."""
    if len(junk) % 2:
        raise ValueError("The JUNK payload must have an even size.")
    audio = np.atleast_2d(np.asarray(audio, dtype=np.float32))
    channels = audio.shape[0]
    pcm = np.round(np.clip(np.nan_to_num(audio), -1.0, 1.0) * 32767.0).astype("<i2").T.tobytes()  # interleaved
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"JUNK" + struct.pack("<I", len(junk)) + junk
            + b"data" + struct.pack("<I", len(pcm)) + pcm + (b"\0" if len(pcm) % 2 else b""))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write_file(path: Path, data: bytes, mtime: int, mode: int = 0o644) -> None:
    """Write `data` atomically (temp file + rename, fsynced) with mtime and atime set to `mtime`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stamp(path: Path, mtime: int) -> None:
    """Give `path` the study's fixed timestamp."""
    os.utime(path, (mtime, mtime))


def sha256_file(path: Path) -> str:
    digest_ = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest_.update(block)
    return digest_.hexdigest()
