"""Generated samples on disk: sprite archives with a manifest, written on a GPU machine, scored on a CPU.

An archive is a plain tar of WebP images plus ``manifest.jsonl`` (one JSON object per image: ``file``,
``prompt``, ``seed``, ``target_color``, ``source`` = train | val | test | freeform, and ``row``, the split row of
a caption, when there is one). A folder holds the same: images and ``manifest.jsonl``. ``pack_samples`` fits the
images into at most ``max_archives`` tars of ``max_bytes`` each: lossless WebP when it fits, else lossy WebP at
the highest quality of ``LOSSY_QUALITIES`` that fits (``benchmarks/sample_packing.py`` measures what that loss
does to the metrics on real sprites). The manifest records the encoding.
"""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pokediff.fileio import write_bytes_atomic

MANIFEST_NAME = "manifest.jsonl"
RUN_INFO_NAME = "run.json"  # optional: {"data": the DataConfig the rows refer to, "generated_by": ...}
ARCHIVE_PATTERN = "samples-{index}.tar"
MiB = 1 << 20
MAX_ARCHIVE_BYTES = 16 * MiB
LOSSY_QUALITIES = (95, 90, 85, 80)
SOURCES = ("train", "val", "test", "freeform")
_TAR_OVERHEAD = 1536  # header + padding per member, at most
_MANIFEST_RESERVE = 512 * 1024  # room kept in each archive for its manifest


@dataclass
class SampleRecord:
    file: str
    prompt: str
    seed: int
    target_color: Optional[str]
    source: str
    row: Optional[int] = None
    encoding: dict = field(default_factory=dict)  # {"format": "webp", "lossless": bool, "quality": int}


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded as ``save_grid`` and the Inception input do."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def encode_webp(array: np.ndarray, quality: Optional[int]) -> bytes:
    """WebP bytes: lossless when ``quality`` is None."""
    buffer = io.BytesIO()
    if quality is None:
        Image.fromarray(array).save(buffer, format="WEBP", lossless=True, quality=80, method=4)
    else:
        Image.fromarray(array).save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def _encode_all(arrays: Sequence[np.ndarray], quality: Optional[int], workers: int) -> list[bytes]:
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow's encoder releases the GIL
        return list(pool.map(lambda a: encode_webp(a, quality), arrays))


def choose_encoding(
    arrays: Sequence[np.ndarray], budget_bytes: int, workers: int = 8
) -> tuple[Optional[int], list[bytes]]:
    """(quality or None for lossless, encoded images): the best encoding whose total fits ``budget_bytes``.

    Lossless is tried on a sample of 64 images first, so a set that cannot fit is not encoded losslessly in full.
    """
    probe = list(arrays[:: max(1, len(arrays) // 64)])[:64]
    for quality in (None, *LOSSY_QUALITIES):
        probe_bytes = sum(len(b) for b in _encode_all(probe, quality, workers))
        if probe_bytes / len(probe) * len(arrays) * 1.05 > budget_bytes and quality != LOSSY_QUALITIES[-1]:
            continue
        encoded = _encode_all(arrays, quality, workers)
        if sum(len(b) + _TAR_OVERHEAD for b in encoded) <= budget_bytes or quality == LOSSY_QUALITIES[-1]:
            return quality, encoded
    raise AssertionError("unreachable")


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pack_samples(
    images: Sequence[np.ndarray],
    records: Sequence[SampleRecord],
    out_dir,
    max_archives: int = 2,
    max_bytes: int = MAX_ARCHIVE_BYTES,
    workers: int = 8,
    run_info: Optional[dict] = None,
) -> dict:
    """Write ``images`` (uint8 HWC) with their ``records`` into ``out_dir/samples-K.tar``; returns a summary.

    Images are split into contiguous, nearly equal parts, one per archive; the encoding is chosen so all parts fit.
    """
    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} manifest records")
    if not images:
        raise ValueError("no images to pack")
    names = [r.file for r in records]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the manifest names a file twice: {', '.join(duplicates[:5])}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = max_archives * (max_bytes - min(_MANIFEST_RESERVE, max_bytes // 8))
    quality, encoded = choose_encoding(images, budget, workers)
    encoding = {"format": "webp", "lossless": quality is None, "quality": quality}
    parts = np.array_split(np.arange(len(images)), max_archives)
    tars = []
    for index, part in enumerate(p for p in parts if len(p)):
        members, manifest = [], []
        for i in part:
            record = dict(asdict(records[i]), encoding=encoding)
            members.append((record["file"], encoded[i]))
            manifest.append(json.dumps(record, ensure_ascii=False))
        members.append((MANIFEST_NAME, ("\n".join(manifest) + "\n").encode()))
        if run_info is not None:
            members.append((RUN_INFO_NAME, json.dumps(run_info, indent=1).encode()))
        path = out_dir / ARCHIVE_PATTERN.format(index=index)
        data = _tar_bytes(members)
        if len(data) > max_bytes:
            raise RuntimeError(
                f"{path} would be {len(data) / MiB:.2f} MiB, over the {max_bytes / MiB:.2f} MiB limit "
                f"even at WebP quality {quality}: generate fewer samples"
            )
        tars.append((path, data, len(part)))
    archives = []
    for path, data, count in tars:  # written only once every part fits
        write_bytes_atomic(path, data)
        archives.append({"file": path.name, "images": count, "bytes": len(data)})
    errors = [
        int(np.abs(np.asarray(decode(encoded[i]), dtype=np.int16) - images[i]).max())
        for i in range(0, len(images), max(1, len(images) // 32))
    ]
    return {"encoding": encoding, "archives": archives, "max_abs_pixel_error_sampled": max(errors)}


def read_run_info(path) -> dict:
    """``run.json`` of a sample folder / archive / folder of archives (the first archive's), or {}."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / RUN_INFO_NAME).is_file():
            return json.loads((path / RUN_INFO_NAME).read_text())
        archives = _archives_in(path)
        return read_run_info(archives[0]) if archives else {}
    with tarfile.open(path) as tar:
        try:
            return json.loads(tar.extractfile(RUN_INFO_NAME).read().decode())
        except KeyError:
            return {}


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _read_manifest(text: str, where: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: line {number} is not JSON: {err}") from None
        missing = [k for k in ("file", "prompt", "seed", "target_color", "source") if k not in record]
        if missing:
            raise ValueError(f"{where}: line {number} lacks {', '.join(missing)}")
        records.append(record)
    if not records:
        raise ValueError(f"{where} lists no samples")
    return records


def _archives_in(path: Path) -> list[Path]:
    return sorted(path.glob("samples-*.tar"))


def load_samples(path) -> list[tuple[dict, Image.Image]]:
    """(manifest record, RGB image) pairs from a sample archive, a folder of archives, or a folder of images with
    ``manifest.jsonl``; in manifest order (archives by name)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"samples not found: {path}")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            out = []
            for record in _read_manifest((path / MANIFEST_NAME).read_text(), str(path / MANIFEST_NAME)):
                file = path / record["file"]
                if not file.is_file():
                    raise FileNotFoundError(f"{path / MANIFEST_NAME} lists {record['file']}, which is missing")
                out.append((record, Image.open(file).convert("RGB")))
            return out
        archives = _archives_in(path)
        if not archives:
            raise ValueError(f"{path} holds neither {MANIFEST_NAME} nor samples-*.tar archives")
        return [pair for archive in archives for pair in load_samples(archive)]
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is neither a folder nor a tar archive of samples")
    with tarfile.open(path) as tar:
        try:
            manifest = tar.extractfile(MANIFEST_NAME)
        except KeyError:
            raise ValueError(f"{path} has no {MANIFEST_NAME}") from None
        records = _read_manifest(manifest.read().decode(), f"{path}:{MANIFEST_NAME}")
        out = []
        for record in records:
            try:
                member = tar.extractfile(record["file"])
            except KeyError:
                raise ValueError(f"{path}: the manifest lists {record['file']}, which is not in the archive") from None
            out.append((record, decode(member.read())))
    return out


def image_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def batches(images: Iterable[Image.Image], batch_size: int):
    """Stacked (B, 3, H, W) batches in [0, 1]."""
    chunk = []
    for image in images:
        chunk.append(image_tensor(image))
        if len(chunk) == batch_size:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)
