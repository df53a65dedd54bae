"""Build a study's stimuli: every item through full precision and every condition, blind and fair.

Fair: all conditions of an item come from one `GenerationRequest`, so they share seed and initial noise
(see lab.generation) and differ only by quantization; the anchor is the full-precision clip low-passed
(zero-phase Butterworth, as BS.1534 anchors are); all clips of an item are loudness-matched together.
Blind: see lab.study.blinding. Resumable: each finished item is appended to a per-rank shard, and a rerun
skips items whose files still have the recorded sha256. Shardable: item i belongs to rank i % world_size
(torchrun sets RANK/WORLD_SIZE), ranks meet at gloo barriers, and rank 0 writes the manifest at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

import quant
from lab import sat
from lab.audio import loudness_match
from lab.generation import GenerationRequest, generate_clip
from lab.quantized import QuantizedModels, duration, quant_source_hash
from lab.requests import validate_prompts
from lab.sat import LoadedModel
from lab.study import blinding
from lab.study.definition import ANCHOR, ANCHORS, HIDDEN_REFERENCE, REFERENCE, StudyDefinition
from lab.study.manifest import (
    MANIFEST_FILE,
    SHARDS_DIR,
    STIMULI_DIR,
    STUDY_FILE,
    Item,
    Manifest,
    Stimulus,
    StudyError,
    load_manifest,
    read_json,
    study_path,
)

ANCHOR_ORDER = 8  # Butterworth order; filtfilt doubles the attenuation slope
log = logging.getLogger(__name__)
BARRIER_TIMEOUT = timedelta(hours=24)  # rank 0 may calibrate quantized models while the others wait
LARGE_BUILD_SECONDS = 30 * 60  # a build estimated longer than this starts only when confirmed


@dataclass(frozen=True)
class BuildEstimate:
    """What building a definition costs, said before it starts: clips generated (every item through full precision
    and each condition), files written, time from the model's measured DiT forward, disk from the WAV size."""
    items: int
    clips: int
    files: int
    seconds_per_clip: float
    file_bytes: int

    @property
    def seconds(self) -> float:
        return self.clips * self.seconds_per_clip

    @property
    def large(self) -> bool:
        return self.seconds > LARGE_BUILD_SECONDS

    def describe(self) -> str:
        return (f"{self.items} items x {self.clips // self.items} clips = {self.clips} clips to generate, about "
                f"{duration(self.seconds)} on this machine ({self.seconds_per_clip:.2g} s per clip; calibration "
                f"not included); {self.files} files, {self.files * self.file_bytes / 2**20:.1f} MiB on disk.")

    def check_confirmed(self, confirmed: bool, how: str) -> None:
        """Refuse a large build unless `confirmed` (`how` says how the user confirms)."""
        if self.large and not confirmed:
            raise ValueError(f"This study is large: {self.describe()} Confirm it ({how}) to build it, or make it "
                             f"smaller (fewer prompts, seeds or conditions, shorter clips, fewer steps).")


def estimate_build(definition: StudyDefinition, loaded: LoadedModel, models: QuantizedModels) -> BuildEstimate:
    """The cost of building `definition` (checked as `build_study` checks it): the clip time scales the model's
    measured DiT forward (`QuantizedModels.measure_speed`, measured once) by the forwards of the study's sampler and
    its clip length; a file is a 16-bit WAV of the clip."""
    request = base_request(definition, loaded)
    forward = models.forward_seconds or models.measure_speed()
    seconds_per_clip = (sat.dit_forwards(request.sampler, request.steps) * forward
                        * request.seconds / models.plan.seconds)
    samples = round(request.seconds * loaded.sample_rate)
    silence = np.zeros((loaded.channels, samples), dtype=np.float32)
    file_bytes = len(blinding.wav_bytes(silence, loaded.sample_rate, bytes(blinding.JUNK_SIZE)))
    return BuildEstimate(items=definition.n_items, clips=definition.n_items * (1 + len(definition.conditions)),
                         files=definition.n_items * len(definition.stimulus_keys),
                         seconds_per_clip=seconds_per_clip, file_bytes=file_bytes)


def build_study(definition: StudyDefinition, loaded: LoadedModel, models: QuantizedModels, root: str | Path, *,
                rank: int = 0, world_size: int = 1, progress: bool = True) -> Manifest:
    """Generate (or resume) the study under `root/<study_id>/` and return its manifest.

    With world_size > 1 every rank calls this with its own rank; torch.distributed is initialised from
    torchrun's environment (gloo) unless the caller did so. Raises StudyError/ValueError for a definition
    the model cannot serve or a folder that holds a different study."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} / world_size {world_size!r}: need 0 <= rank < world_size.")
    study_dir = study_path(root, definition.study_id)
    request = base_request(definition, loaded)
    recipes = {name: {"recipe": quant.get_recipe(name).name, "hash": quant.get_recipe(name).hash()}
               for name in definition.conditions}
    group, created_group = _process_group(rank, world_size)
    try:
        if rank == 0:
            _prepare(study_dir, definition, loaded)
            if world_size > 1:  # build (and cache on disk) every quantized model once, so ranks never race
                for name in definition.conditions:  # writing the same cache file
                    models.get(name)
        _barrier(group, world_size)
        created = int(read_json(study_dir / STUDY_FILE)["created"])
        secret = blinding.read_secret(study_dir)
        key = _build_key(loaded, request, recipes)
        mine = [index for index in range(definition.n_items) if index % world_size == rank]
        done = _finished_items(study_dir, key, only=set(mine))
        shard = study_dir / SHARDS_DIR / f"rank-{rank}.jsonl"
        from tqdm.auto import tqdm

        desc = definition.study_id + (f" rank {rank}/{world_size}" if world_size > 1 else "")
        with tqdm(total=len(mine), desc=desc, unit="item", disable=not progress, position=rank) as bar:
            for index in mine:
                if index not in done:
                    prompt, seed = definition.items[index]
                    record = _build_item(index, prompt, seed, definition, loaded, models, request, secret,
                                         study_dir / STIMULI_DIR, created)
                    _append_record(shard, {**record, "key": key}, created)
                bar.update()
        _barrier(group, world_size)
        if rank == 0:
            _write_manifest(study_dir, definition, loaded, request, recipes, key, created)
            for warning in shared_items(root, load_manifest(study_dir, verify=False)):
                log.warning(warning)
        _barrier(group, world_size)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()
    return load_manifest(study_dir, verify=False)


def shared_items(root: str | Path, manifest: Manifest) -> list[str]:
    """One warning per other study under `root` built from the same model (fingerprint) with a (prompt, seed)
    of this one: their clips are the same audio, so a rater of both can label one study's clips with the other's
    (a MUSHRA study's open reference names the reference of an AB or ACR study)."""
    mine = set(manifest.definition.items)
    warnings = []
    for path in sorted(Path(root).glob(f"*/{STUDY_FILE}")):
        if path.parent.name == manifest.study_id:
            continue
        try:
            other = read_json(path)
            items = set(StudyDefinition.from_dict(other["definition"]).items)
            fingerprint = other["model"]["fingerprint"]
        except (KeyError, TypeError, ValueError):
            continue  # not a study this version can read: nothing to compare
        shared = mine & items
        if shared and fingerprint == manifest.model["fingerprint"]:
            warnings.append(f"Study {manifest.study_id!r} shares {len(shared)} of its {len(mine)} items (model, "
                            f"prompt and seed) with study {path.parent.name!r}: a rater of both hears the same "
                            "clips in both and can label one study's clips with the other's. Use other seeds "
                            "(or prompts) unless the raters of the two studies are different people.")
    return warnings


def base_request(definition: StudyDefinition, loaded: LoadedModel) -> GenerationRequest:
    """The request every item is generated with (prompt and seed filled in per item): the definition's sampler
    settings, the model's defaults where it leaves them None, with every prompt of the definition checked as the
    Compare tab checks its request (`lab.requests.validate_prompts`)."""
    settings = loaded.sampling.replace(steps=definition.steps, cfg_scale=definition.cfg_scale,
                                       sampler_type=definition.sampler_type)
    request = GenerationRequest(prompt=definition.prompts[0], seconds=float(definition.seconds or loaded.seconds),
                                steps=settings.steps, cfg_scale=float(settings.cfg_scale), seed=definition.seeds[0],
                                sampler=settings.sampler_type, sigma_min=settings.sigma_min,
                                sigma_max=settings.sigma_max)
    validate_prompts(loaded, request, definition.prompts)
    if definition.anchor and ANCHORS[definition.anchor] >= 0.45 * loaded.sample_rate:
        raise ValueError(f"The {definition.anchor} anchor needs a sample rate above "
                         f"{ANCHORS[definition.anchor] / 0.45:.0f} Hz; this model runs at {loaded.sample_rate} Hz.")
    return request


def lowpass(audio: np.ndarray, cutoff_hz: float, sample_rate: int, order: int = ANCHOR_ORDER) -> np.ndarray:
    """Zero-phase Butterworth low-pass of (channels, samples) audio (no delay against the reference)."""
    from scipy.signal import butter, sosfiltfilt

    sos = butter(order, cutoff_hz, btype="low", fs=sample_rate, output="sos")
    padlen = min(3 * (2 * len(sos) + 1), audio.shape[-1] - 1)
    return sosfiltfilt(sos, audio, axis=-1, padlen=padlen).astype(np.float32)


def stimulus_key(prompt: str, seed: int, condition: str) -> str:
    """What a stimulus is, as the HMAC of its file name and JUNK bytes sees it."""
    return json.dumps([prompt, seed, condition])


def _prepare(study_dir: Path, definition: StudyDefinition, loaded: LoadedModel) -> None:
    """Create the study folder, its secret and study.json; refuse a folder that holds another study."""
    model = {"id": loaded.model_id, "fingerprint": loaded.fingerprint}
    path = study_dir / STUDY_FILE
    if path.is_file():
        study = read_json(path)
        if study.get("definition") != definition.to_dict():
            changed = sorted(name for name, value in definition.to_dict().items()
                             if study.get("definition", {}).get(name) != value)
            raise StudyError(f"{study_dir} already holds study {definition.study_id!r} with a different definition "
                             f"(changed: {', '.join(changed)}). Use a new study_id, or delete the folder to start over.")
        if study.get("model") != model:
            raise StudyError(f"{study_dir} was built with model {study.get('model')}, not {model}: a study must come "
                             "from one model. Use a new study_id, or load the model it was built with.")
        blinding.read_secret(study_dir)  # a new secret would rename every stimulus: refuse instead
        return
    created = int(time.time())
    blinding.ensure_secret(study_dir)
    blinding.stamp(study_dir / blinding.SECRET_FILE, created)
    text = json.dumps({"study_id": definition.study_id, "created": created, "definition": definition.to_dict(),
                       "model": model}, indent=2, ensure_ascii=False)
    blinding.write_file(path, text.encode(), created)


def _build_item(index: int, prompt: str, seed: int, definition: StudyDefinition, loaded: LoadedModel,
                models: QuantizedModels, request: GenerationRequest, secret: bytes, stimuli_dir: Path,
                created: int) -> dict:
    """Generate, anchor, loudness-match and write one item; returns its shard record."""
    request = dataclasses.replace(request, prompt=prompt, seed=seed)
    sample_rate = loaded.sample_rate
    with torch.no_grad():
        clips = {REFERENCE: generate_clip(loaded.model, loaded, request).audio}
        for name in definition.conditions:
            model, _ = models.get(name)
            clips[name] = generate_clip(model, loaded, request, quantized=True).audio
    if definition.anchor:
        clips[ANCHOR] = lowpass(clips[REFERENCE], ANCHORS[definition.anchor], sample_rate)
    audio = dict(zip(clips, loudness_match(list(clips.values()), sample_rate)))
    audio[HIDDEN_REFERENCE] = audio[REFERENCE]
    stimuli = []
    for condition in definition.stimulus_keys:
        key = stimulus_key(prompt, seed, condition)
        name = blinding.stimulus_name(secret, key)
        data = blinding.wav_bytes(audio[condition], sample_rate, blinding.junk_bytes(secret, key))
        blinding.write_file(stimuli_dir / name, data, created)
        stimuli.append({"condition": condition, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                        "seconds": round(audio[condition].shape[-1] / sample_rate, 6)})
    return {"index": index, "prompt": prompt, "seed": seed, "stimuli": stimuli}


def _append_record(shard: Path, record: dict, created: int) -> None:
    shard.parent.mkdir(parents=True, exist_ok=True)
    torn = False  # a crash cut the last line: end it, so this record stays a line of its own
    if shard.is_file() and shard.stat().st_size:
        with open(shard, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
    with open(shard, "ab") as handle:
        handle.write((b"\n" if torn else b"") + json.dumps(record, ensure_ascii=False).encode() + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    blinding.stamp(shard, created)


def _read_records(study_dir: Path) -> list[dict]:
    """Every shard record, any rank's (a resumed build may use another world size); torn lines are skipped."""
    records = []
    for shard in sorted((study_dir / SHARDS_DIR).glob("rank-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that item is simply built again
    return records


def _finished_items(study_dir: Path, key: str, only: set[int] | None = None) -> dict[int, dict]:
    """Item index -> record, for items built with this key whose files all still match their sha256."""
    finished = {}
    for record in _read_records(study_dir):
        if record.get("key") != key or record["index"] in finished or (only is not None and record["index"] not in only):
            continue
        paths = [(study_dir / STIMULI_DIR / s["file"], s["sha256"]) for s in record["stimuli"]]
        if all(path.is_file() and blinding.sha256_file(path) == sha for path, sha in paths):
            finished[record["index"]] = record
    return finished


def _build_key(loaded: LoadedModel, request: GenerationRequest, recipes: dict) -> str:
    """Id of everything an item's audio depends on besides the definition (checked via study.json)."""
    spec = json.dumps([loaded.fingerprint, _sampler(request), recipes, quant_source_hash()], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _sampler(request: GenerationRequest) -> dict:
    return {"steps": request.steps, "cfg_scale": request.cfg_scale, "sampler_type": request.sampler,
            "sigma_min": request.sigma_min, "sigma_max": request.sigma_max, "seconds": request.seconds}


def _write_manifest(study_dir: Path, definition: StudyDefinition, loaded: LoadedModel, request: GenerationRequest,
                    recipes: dict, key: str, created: int) -> None:
    """Gather every rank's records (their files verified by sha256) into manifest.json."""
    records = _finished_items(study_dir, key)
    missing = [index for index in range(definition.n_items) if index not in records]
    if missing:
        raise StudyError(f"Items {missing[:10]} of study {definition.study_id!r} have no finished record: a rank "
                         "failed. Run the same build command again to resume.")
    items = tuple(Item(index=index, prompt=records[index]["prompt"], seed=records[index]["seed"],
                       stimuli=tuple(Stimulus(**s) for s in records[index]["stimuli"]))
                  for index in range(definition.n_items))
    manifest = Manifest(study_dir=study_dir, study_id=definition.study_id, created=created, definition=definition,
                        model={"id": loaded.model_id, "fingerprint": loaded.fingerprint,
                               "sample_rate": loaded.sample_rate, "quant_source": quant_source_hash()},
                        sampler=_sampler(request), recipes=recipes, items=items)
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False)
    blinding.write_file(study_dir / MANIFEST_FILE, text.encode(), created)


def _process_group(rank: int, world_size: int):
    """(gloo group for barriers or None, whether we initialised torch.distributed and must tear it down)."""
    if world_size == 1:
        return None, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise ValueError("world_size > 1 needs torch.distributed: launch with torchrun (it sets MASTER_ADDR, "
                             "MASTER_PORT, RANK and WORLD_SIZE).")
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=BARRIER_TIMEOUT)
        created = True
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"rank/world_size {rank}/{world_size} do not match torch.distributed's "
                         f"{dist.get_rank()}/{dist.get_world_size()}.")
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return group, created


def _barrier(group, world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier(group=group)
