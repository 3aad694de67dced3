"""Save and load an artifact; validate it. Nothing else writes or reads one.

An artifact is a directory:
    model.keras   the network (Keras 3 zip format, loaded with safe_mode=True; no pickle)
    vocab.json    {"chars": [...]}: id -> character
    meta.json     format version, network config, corpus, split, validation loss, training figures,
                  versions and the command line that made it
and, when `chargen train` made it, history.json, history.csv and loss.png.

Directories are written under a temporary name beside the target and renamed into place, so a crash
never leaves half an artifact under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras

from model.network import ModelConfig, build_model, config_of
from model.vocab import Vocab

FORMAT_VERSION = 1
FILES = ("model.keras", "vocab.json", "meta.json")


class ArtifactError(Exception):
    """Base class: an artifact that cannot be used. The message names the path and the problem."""


class ArtifactNotFound(ArtifactError):
    pass


class MissingFile(ArtifactError):
    pass


class CorruptModel(ArtifactError):
    pass


class BadVocab(ArtifactError):
    pass


class BadMeta(ArtifactError):
    pass


class UnsupportedFormat(ArtifactError):
    pass


class VocabMismatch(ArtifactError):
    pass


@dataclass
class Artifact:
    path: Path
    model: keras.Model
    vocab: Vocab
    meta: dict

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["config"])


def resolve(path: str | Path) -> Path:
    """An artifact directory, or a training run directory whose best artifact is `best/`."""
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFound(f"{path}: no such artifact directory")
    if not path.is_dir():
        raise ArtifactNotFound(f"{path}: is a file; an artifact is a directory holding {', '.join(FILES)}")
    if not (path / "meta.json").exists() and (path / "best" / "meta.json").exists():
        return path / "best"
    return path


def load(path: str | Path) -> Artifact:
    path = resolve(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise MissingFile(f"{path}: missing {', '.join(missing)} (an artifact holds {', '.join(FILES)})")

    meta = _read_meta(path / "meta.json")
    vocab = _read_vocab(path / "vocab.json")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise BadMeta(f"{path / 'meta.json'}: invalid config: {e}") from None

    model_path = path / "model.keras"
    if not zipfile.is_zipfile(model_path):
        raise CorruptModel(f"{model_path}: not a Keras archive (not a zip file; truncated or overwritten?)")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types for damaged archives
        raise CorruptModel(f"{model_path}: cannot be loaded: {type(e).__name__}: {e}") from None

    try:
        found = config_of(model)
    except ValueError as e:
        raise CorruptModel(f"{model_path}: not a chargen network: {e}") from None
    if (found.cell, found.layers, found.units, found.embedding) != (config.cell, config.layers, config.units, config.embedding):
        raise BadMeta(f"{path}: meta.json describes {config} but model.keras holds {found}")
    vocab_in = model.get_layer("embedding").input_dim
    vocab_out = model.get_layer("logits").units
    if not len(vocab) == vocab_in == vocab_out:
        raise VocabMismatch(
            f"{path}: vocab.json has {len(vocab)} characters but the model was built for "
            f"{vocab_in} (input) and {vocab_out} (output)"
        )
    if meta.get("vocab_size", len(vocab)) != len(vocab):
        raise VocabMismatch(f"{path}: meta.json says vocab_size {meta['vocab_size']} but vocab.json has {len(vocab)}")
    return Artifact(path, model, vocab, meta)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadMeta(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BadMeta(f"{path}: expected a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"{path}: format_version {version!r} is not supported (this chargen reads version {FORMAT_VERSION})"
        )
    if not isinstance(meta.get("config"), dict):
        raise BadMeta(f"{path}: no 'config' object")
    return meta


def _read_vocab(path: Path) -> Vocab:
    try:
        return Vocab.from_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise BadVocab(f"{path}: {e}") from None


# ---------------------------------------------------------------- saving


def save(path: str | Path, model: keras.Model, vocab: Vocab, meta: dict, extra_files: dict[str, Path] | None = None) -> Path:
    """Write a new artifact directory at `path` (which must not exist) atomically.

    The network is saved without optimizer state or dropout settings that only matter in training:
    a fresh inference model with the same weights.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(meta["config"])
    meta = {"format_version": FORMAT_VERSION, **meta, "vocab_size": len(vocab)}

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        inference = build_model(config, len(vocab))
        inference.set_weights(model.get_weights())
        inference.save(tmp / "model.keras")
        (tmp / "vocab.json").write_text(vocab.to_json(), encoding="utf-8")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        _fsync_dir(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def point(link: str | Path, target: str | Path) -> None:
    """Atomically make `link` a symlink to `target` (relative), replacing what it pointed to."""
    link, target = Path(link), Path(target)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
