"""Generated 12-lead ECGs from the ``deepfake-ecg`` package (Pulse2Pulse GAN) as a record source.

The ``deepfake-ecg`` package (MIT; Thambawita et al. 2021, "DeepFake electrocardiograms", medRxiv
2021.04.27.21256189) ships a trained Pulse2Pulse generator (10.6 M parameters, ``checkpoints/g_stat.pt``, 42 MB)
that maps uniform noise ``(B, 8, 5000)`` in ``[-1, 1]`` to ``(B, 8, 5000)`` ``tanh`` outputs; the package scales
them by 6000 and truncates to integer microvolts: 10 s at 500 Hz of the leads I, II, V1-V6 (in that order).
:class:`DeepfakeSource` builds that generator from the package's own class and loads the checkpoint itself
(``torch.load(weights_only=True, map_location=...)`` plus a state-dict key / shape check, :func:`load_generator`);
it never calls the package's ``generate()``, which unpickles the checkpoint without ``weights_only`` and writes
one text file per record.

The four limb leads the generator does not produce are derived from I and II (Einthoven / Goldberger)::

    III = II - I      aVR = -(I + II) / 2      aVL = I - II / 2      aVF = II - I / 2

and marked as derived: ``record.header["derived_leads"] == ["III", "aVR", "aVL", "aVF"]`` (kept per record in the
cache's ``index.jsonl``; see :attr:`ecgfm.data.record.ECGRecord.derived_leads`) and the source's
``derived_leads`` attribute (kept in the cache manifest's ``sources``). All twelve leads are marked present in
``lead_mask`` (they are valid signals), so a model sees a full 12-lead record in which four leads are exact
linear combinations of two others.

Determinism: record ``i`` of seed ``s`` is a pure function of ``(s, i)``, the weights and the device: its noise
comes from its own ``torch.Generator`` seeded from ``numpy.random.SeedSequence([s, i])`` (drawn on the CPU
whatever the device), and the generator network always runs on fixed-shape chunks of :data:`CHUNK_RECORDS`
consecutive records (chunk ``c`` = records ``16c .. 16c+15``; a tail chunk is completed with the noise of the
records that follow, which are then discarded). Batch size, worker count, order of reading and ``n`` therefore
never change a record's values (a forward pass of a different batch shape can pick a different kernel and change
the float32 outputs by ~1e-6, i.e. 1 uV after truncation on ~0.05% of samples, measured for chunks of 1 vs 16
records; the fixed chunk shape avoids it).
A corpus of ``n`` records is a prefix of any larger corpus of the same seed.

Cost per record (CPU time, torch 1 thread per worker, on the 2 shared cores of the development machine): the
20,000-record cache at the default preprocessing (500 -> 100 Hz polyphase resampling, 0.5 Hz high-pass, z-score:
the same path as real records) cost 18.2 ms of CPU per record end to end (generator forward pass, lead
derivation, preprocessing, shard writes, worker start-up), i.e. ~55 records/s per free core; on its own the
forward pass measured 14 ms and preprocessing 9-18 ms per record on the busy machine. A conversion worker holds
torch, the generator (42 MB of weights) and one block of ``batch_size`` records (8 x 5000 int32 each, 160 kB);
the converting process tree peaked at 2.1 GB resident (parent + 2 workers).

Example::

    src = DeepfakeSource(n=20_000, seed=0)
    rec = src.load(src.record_ids()[0])      # (12, 5000) float32 mV at 500 Hz, 4 derived leads
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import io
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ecgfm.data.record import CANONICAL_LEADS, N_LEADS, ECGDataError, ECGRecord

#: Leads the generator outputs, in its row order.
GENERATED_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
#: Leads computed from I and II (marked in ``header["derived_leads"]``).
DERIVED_LEADS: tuple[str, ...] = ("III", "aVR", "aVL", "aVF")
#: Records per generator forward pass: the unit of determinism (a fixed batch shape, see the module docstring).
CHUNK_RECORDS = 16
#: Sampling rate (Hz) and length (samples) of a generated record: 10 s at 500 Hz.
FS = 500.0
N_SAMPLES = 5000
#: The package's output scaling: ``int(tanh_output * 6000)`` microvolts.
UV_SCALE = 6000.0
PACKAGE = "deepfake-ecg"
INSTALL_HINT = ("the deepfake-ecg package is not installed: pip install 'ecgfm[deepfake]' (or pip install "
                "deepfake-ecg; in a checkout: pip install -e '.[deepfake]', or scripts/setup.sh with the dev extras)")
_ID_RE = re.compile(r"^deepfake_s(\d+)_(\d+)$")


# ----------------------------------------------------------------------------------------------- package access

def _generator_module():
    """The package's ``deepfakeecg.models.pulse2pulse`` module (raises ImportError with the install command)."""
    try:
        return importlib.import_module("deepfakeecg.models.pulse2pulse")
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def package_version() -> str:
    """Installed version of ``deepfake-ecg`` (raises ImportError with the install command when absent)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(INSTALL_HINT) from exc


def default_checkpoint() -> Path:
    """Path of the generator checkpoint inside the installed package (``deepfakeecg/checkpoints/g_stat.pt``)."""
    module = _generator_module()
    return Path(module.__file__).resolve().parents[1] / "checkpoints" / "g_stat.pt"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _build_generator_module():
    """A fresh ``Pulse2pulseGenerator`` built from the package's class, leaving the global torch RNG untouched
    (its constructor draws a random initialisation) and silencing its ``nn.init.kaiming_normal`` deprecation
    warning."""
    import torch

    module = _generator_module()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.Pulse2pulseGenerator()


def load_generator(checkpoint: str | Path | None = None, device: str = "cpu", data: bytes | None = None):
    """Build the Pulse2Pulse generator and load its weights safely.

    The checkpoint must be a ``{"stat_dict": state_dict}`` dict (the package's format) loadable with
    ``torch.load(weights_only=True)``, whose keys and tensor shapes match the package's
    ``Pulse2pulseGenerator`` exactly.

    Args:
        checkpoint: checkpoint file (None: the one shipped in the package).
        device: torch device to load onto (``map_location``) and run on.
        data: the file's bytes when already read (avoids a second read); ``checkpoint`` still names it in errors.

    Returns:
        The generator in eval mode on ``device``, parameters frozen.

    Raises:
        ImportError: ``deepfake-ecg`` is not installed (the message gives the install command).
        ECGDataError: naming the file, when it cannot be loaded with ``weights_only=True``, is not the expected
            dict, or its keys / shapes do not match the generator.
    """
    import torch

    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    model = _build_generator_module()
    try:
        raw = data if data is not None else path.read_bytes()
        ckpt = torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except OSError as exc:
        raise ECGDataError(path, f"cannot read the generator checkpoint: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - UnpicklingError (non-weights content), corrupt zip, ...
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()   # torch's message carries terminal colours
        first = text.splitlines()[0] if text else ""
        raise ECGDataError(path, f"cannot be loaded as a weights-only torch checkpoint onto {device!r} "
                                 f"(torch.load(weights_only=True): {type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("stat_dict"), dict):
        got = sorted(map(str, ckpt))[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ECGDataError(path, f"expected a dict {{'stat_dict': state_dict}} (the deepfake-ecg format), got {got}")
    state = ckpt["stat_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ECGDataError(path, f"state dict does not match Pulse2pulseGenerator: missing keys {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                                 f"{' ...' if len(unexpected) > 5 else ''}")
    bad = [k for k in expected if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape]
    if bad:
        k = bad[0]
        got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        raise ECGDataError(path, f"state dict entry {k!r} has shape {got}, expected {tuple(expected[k].shape)} "
                                 f"({len(bad)} mismatching entries)")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------- generation

def record_seed(seed: int, index: int) -> int:
    """The 63-bit torch seed of record ``index`` of corpus ``seed`` (``SeedSequence([seed, index])``)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def record_noise(seed: int, index: int):
    """The generator input of record ``index``: ``(8, 5000)`` float32 uniform in ``[-1, 1)``, drawn on the CPU
    from its own ``torch.Generator`` (independent of the device, the batch and every other record)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(record_seed(seed, index))
    return torch.empty(len(GENERATED_LEADS), N_SAMPLES, dtype=torch.float32).uniform_(-1.0, 1.0, generator=g)


def generate_uv(model: Any, seed: int, indices: Sequence[int], device: str = "cpu",
                chunk_records: int = CHUNK_RECORDS) -> np.ndarray:
    """Generate records ``indices`` of corpus ``seed`` as the package does (integer microvolts).

    Every forward pass is one whole chunk of ``chunk_records`` consecutive records (fixed batch shape), so a
    record's values do not depend on which other records are generated with it.

    Args:
        model: generator from :func:`load_generator`.
        seed: corpus seed.
        indices: record indices (any order; duplicates allowed).
        device: device the model is on.
        chunk_records: records per forward pass (the determinism unit).

    Returns:
        ``(len(indices), 8, 5000)`` int32 microvolts, rows in :data:`GENERATED_LEADS` order.
    """
    import torch

    indices = [int(i) for i in indices]
    out = np.empty((len(indices), len(GENERATED_LEADS), N_SAMPLES), dtype=np.int32)
    by_chunk: dict[int, list[int]] = {}
    for pos, i in enumerate(indices):
        by_chunk.setdefault(i // chunk_records, []).append(pos)
    with torch.inference_mode():
        for c in sorted(by_chunk):
            lo = c * chunk_records
            noise = torch.stack([record_noise(seed, j) for j in range(lo, lo + chunk_records)]).to(device)
            # the package's scaling: int(tanh * 6000) truncates toward zero (torch .int())
            uv = (model(noise) * UV_SCALE).to(torch.int32).cpu().numpy()
            for pos in by_chunk[c]:
                out[pos] = uv[indices[pos] - lo]
    return out


def twelve_leads(uv: np.ndarray) -> np.ndarray:
    """Place the 8 generated leads in the canonical 12-lead layout and derive III, aVR, aVL, aVF.

    Args:
        uv: ``(8, T)`` integer (or float) microvolts in :data:`GENERATED_LEADS` order.

    Returns:
        ``(12, T)`` float32 millivolts in :data:`~ecgfm.data.record.CANONICAL_LEADS` order.
    """
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim != 2 or uv.shape[0] != len(GENERATED_LEADS):
        raise ValueError(f"expected (8, T) leads {GENERATED_LEADS}, got shape {uv.shape}")
    out = np.empty((N_LEADS, uv.shape[1]), dtype=np.float64)
    for row, lead in enumerate(GENERATED_LEADS):
        out[CANONICAL_LEADS.index(lead)] = uv[row]
    lead_i, lead_ii = uv[0], uv[1]
    out[CANONICAL_LEADS.index("III")] = lead_ii - lead_i
    out[CANONICAL_LEADS.index("aVR")] = -(lead_i + lead_ii) / 2.0
    out[CANONICAL_LEADS.index("aVL")] = lead_i - lead_ii / 2.0
    out[CANONICAL_LEADS.index("aVF")] = lead_ii - lead_i / 2.0
    return (out / 1000.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- the source

class DeepfakeSource:
    """``n`` generated 10 s, 500 Hz, 12-lead ECGs (8 generated + 4 derived leads) as a
    :class:`~ecgfm.data.record.RecordSource` (picklable: the model is built lazily in each process).

    Record ids are ``deepfake_s<seed>_<i>`` (``i`` = 0 .. n-1), the source name is ``"deepfake"``, there are no
    labels and no patient ids (each record is its own patient for patient-disjoint hold-outs). ``load`` generates
    ``batch_size`` records (rounded up to whole :data:`CHUNK_RECORDS` chunks) from the chunk holding the requested
    one and keeps them, so the cache's shard-by-shard conversion (each worker converts consecutive records) runs
    the generator batched and generates each chunk once; values never depend on ``batch_size``, the worker count
    or the reading order (see the module docstring). Cost: ~18 ms of CPU per cached record (generation + preprocessing to 100 Hz, one core).

    Public attributes (kept in the cache manifest's ``sources``, so a change of any of them gives a new cache plan):
    ``n``, ``seed``, ``device``, ``chunk_records``, ``package_version``, ``weights_sha256`` (of the checkpoint),
    ``generator_sha256`` (of the package's ``pulse2pulse.py``), ``generated_leads`` and ``derived_leads``
    (comma-separated). :meth:`fingerprint` hashes them.

    Args:
        n: number of records (>= 1).
        seed: corpus seed (>= 0).
        batch_size: records generated per block (memory / latency only; never changes values).
        device: torch device of the generator (``"cpu"``, ``"cuda"``); outputs on another device may differ by
            float rounding, so the device is part of the source's identity.
        chunk_records: records per fixed-shape forward pass (part of the identity; keep the default).
        checkpoint: generator checkpoint (None: the package's ``checkpoints/g_stat.pt``).
        torch_threads: torch intra-op threads while generating (restored afterwards; None: leave torch's setting).
            1 suits conversion workers sharing a few cores.

    Raises:
        ImportError: ``deepfake-ecg`` is not installed (the message gives the install command).
        ValueError: bad ``n``, ``seed``, ``batch_size`` or ``chunk_records``.
        ECGDataError: the checkpoint file does not exist.
    """

    name = "deepfake"

    def __init__(self, n: int, seed: int = 0, batch_size: int = 64, device: str = "cpu",
                 chunk_records: int = CHUNK_RECORDS, checkpoint: str | Path | None = None,
                 torch_threads: int | None = 1):
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if int(batch_size) < 1 or int(chunk_records) < 1:
            raise ValueError(f"batch_size and chunk_records must be >= 1, got {batch_size}, {chunk_records}")
        if torch_threads is not None and int(torch_threads) < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
        self.n, self.seed, self.device, self.chunk_records = int(n), int(seed), str(device), int(chunk_records)
        self.package_version = package_version()
        path = Path(checkpoint).resolve() if checkpoint is not None else default_checkpoint()
        if not path.is_file():
            raise ECGDataError(path, "generator checkpoint not found (reinstall deepfake-ecg, or pass checkpoint=)")
        self._checkpoint = str(path)
        self._code = str(Path(_generator_module().__file__).resolve())
        self.weights_sha256 = _sha256_file(path)
        self.generator_sha256 = _sha256_file(Path(self._code))
        self.generated_leads = ",".join(GENERATED_LEADS)
        self.derived_leads = ",".join(DERIVED_LEADS)
        self._block_records = -(-int(batch_size) // self.chunk_records) * self.chunk_records
        self._torch_threads = None if torch_threads is None else int(torch_threads)
        self._model: Any = None
        self._block: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None
        state["_block"] = None
        return state

    def __repr__(self) -> str:
        return (f"DeepfakeSource(n={self.n}, seed={self.seed}, device={self.device!r}, chunk_records="
                f"{self.chunk_records}, deepfake-ecg {self.package_version}, weights {self.weights_sha256[:12]}, "
                f"code {self.generator_sha256[:12]})")

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        """sha256 of what defines the records: package version, weights and generator-code sha256, n, seed,
        chunk size, device, lead layout."""
        payload = "|".join(str(v) for v in (self.package_version, self.weights_sha256, self.generator_sha256,
                                            self.n, self.seed, self.chunk_records, self.device,
                                            self.generated_leads, self.derived_leads))
        return hashlib.sha256(payload.encode()).hexdigest()

    def record_ids(self) -> list[str]:
        return [f"deepfake_s{self.seed}_{i}" for i in range(self.n)]

    def input_files(self, record_id: str) -> list[str]:
        """No per-record files (the cache records none; the checkpoint is tracked by :meth:`label_files`)."""
        return []

    def label_files(self) -> list[str]:
        """The files whose contents define every record: the checkpoint and the generator's code. The cache
        stat-checks them on reuse; a changed one changes ``weights_sha256`` / ``generator_sha256`` and so the
        plan, and the cache is rebuilt."""
        return [self._checkpoint, self._code]

    def _ensure_model(self) -> Any:
        if self._model is None:
            data = Path(self._checkpoint).read_bytes()
            if _sha256_bytes(data) != self.weights_sha256:
                raise ECGDataError(self._checkpoint, "generator checkpoint changed since this source was built "
                                                     "(sha256 differs); build the source again")
            self._model = load_generator(self._checkpoint, self.device, data=data)
        return self._model

    def generate_block(self, indices: Sequence[int]) -> np.ndarray:
        """Generate records ``indices`` as ``(len(indices), 8, 5000)`` int32 microvolts (see :func:`generate_uv`).
        """
        import torch

        model = self._ensure_model()
        before = torch.get_num_threads()
        if self._torch_threads is not None and self._torch_threads != before:
            torch.set_num_threads(self._torch_threads)
        try:
            return generate_uv(model, self.seed, indices, self.device, self.chunk_records)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def _index(self, record_id: str) -> int:
        m = _ID_RE.match(str(record_id))
        if m is None or int(m.group(1)) != self.seed:
            raise ECGDataError(f"deepfake/{record_id}", f"not a record id of this source (expected "
                                                        f"'deepfake_s{self.seed}_<index>')")
        index = int(m.group(2))
        if index >= self.n or str(index) != m.group(2):
            raise ECGDataError(f"deepfake/{record_id}", f"index {m.group(2)} is outside this source (n={self.n})")
        return index

    def load(self, record_id: str) -> ECGRecord:
        """Generate record ``record_id``: ``(12, 5000)`` float32 mV at 500 Hz, all 12 leads present, III / aVR /
        aVL / aVF derived (``header["derived_leads"]``)."""
        index = self._index(record_id)
        if self._block is None or not 0 <= index - self._block[0] < len(self._block[1]):
            # the next batch_size records from the chunk holding this one: a shard converted in order generates
            # each of its chunks once (at most one chunk shared with the neighbouring shard is generated twice)
            lo = index // self.chunk_records * self.chunk_records
            self._block = (lo, self.generate_block(range(lo, min(self.n, lo + self._block_records))))
        uv = self._block[1][index - self._block[0]]
        return ECGRecord(
            signal=twelve_leads(uv), fs=FS, lead_mask=np.ones(N_LEADS, dtype=bool), record_id=str(record_id),
            source=self.name, patient_id=None, labels=(),
            meta={"generator": PACKAGE, "seed": self.seed, "index": index},
            header={"units": "mV", "resolution_uV": 1, "lead_names": list(GENERATED_LEADS),
                    "derived_leads": list(DERIVED_LEADS), "fs_original": FS,
                    "generator": f"{PACKAGE} {self.package_version} Pulse2Pulse"},
        ).validate(f"deepfake/{record_id}")
