"""Many LoRA adapters on one copy of the base weights, routed per token inside the engine's flattened batch.

A continuous-batching step is one packed sequence holding the query tokens of every scheduled request, so PEFT's
per-sample `adapter_names` cannot express it. Instead (S-LoRA / punica style, in plain torch):

- every loaded adapter gets a *slot* (an int, never reused); a request carries its adapter's slot;
- before each step, a hook at the engine's boundary writes each query token's slot into a static index buffer
  (updated in place, like the library's own inputs, so captured CUDA graphs read the new values);
- each adapted `nn.Linear` gets a forward hook adding `((x A^T) * mask) B^T`, where A stacks the rank rows of every
  adapter loaded on that layer, B their columns (scale folded in), and `mask[t, c]` is 1 when column c belongs to
  token t's slot. Slot 0 (no adapter) matches no column, so base tokens get an exact +0.

Adapters may differ in rank, alpha and target modules: each layer holds only the columns of the adapters that target
it. Loading grows the stacked tensors (which invalidates captured CUDA graphs, recaptured lazily) or reuses the
columns of an evicted adapter in place. Adapters this cannot express (DoRA, modules_to_save, biases, per-module rank
patterns, embedding or output-layer targets) raise `NotRoutableError`; the model cache then serves them merged.
"""

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.models import adapter_config
from util.errors import InvalidInputError, OverloadedError

log = logging.getLogger(__name__)

PREFIX = "base_model.model."


class NotRoutableError(Exception):
    """An adapter that per-token routing cannot serve exactly (the caller falls back to a merged copy)."""


@dataclass
class AdapterWeights:
    """One adapter read from disk: per module path, A [r, in] and B [out, r] with the LoRA scale folded into B."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """Bytes of its LoRA matrices (as read)."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers.values())


def routable_reason(cfg: dict[str, Any]) -> str | None:
    """Why an adapter config cannot be routed per token (None when it can)."""
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return f"peft_type {cfg.get('peft_type')!r} is not LoRA"
    checks = {
        "use_dora": "DoRA adapters",
        "modules_to_save": "adapters with modules_to_save",
        "rank_pattern": "per-module rank patterns",
        "alpha_pattern": "per-module alpha patterns",
        "fan_in_fan_out": "fan_in_fan_out layers",
        "lora_bias": "LoRA biases",
        "layers_to_transform": "layers_to_transform",
    }
    for key, what in checks.items():
        if cfg.get(key):
            return f"{what} are not routed per token"
    if cfg.get("bias", "none") not in (None, "none"):
        return "adapters that train biases are not routed per token"
    return None


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's saved tensors (safetensors, else the legacy .bin), on CPU."""
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st), device="cpu")
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(str(legacy), map_location="cpu", weights_only=True)
    raise InvalidInputError(f"The adapter at '{path.name}' has no adapter_model.safetensors (or .bin).")


def read_adapter(path: Path, model: nn.Module) -> AdapterWeights:
    """Read a PEFT LoRA folder and check it against `model` (422 if it does not fit; NotRoutableError if unroutable)."""
    cfg = adapter_config(path)
    reason = routable_reason(cfg)
    if reason:
        raise NotRoutableError(reason)
    try:
        state = _load_state(path)
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file (safetensors, pickle, OS) is the client's 422
        name = type(exc).__name__
        raise InvalidInputError(f"The adapter at '{path.name}' has unreadable weights ({name}).") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise NotRoutableError(f"weights other than LoRA A/B matrices ({key})")
    if not pairs:
        raise InvalidInputError(f"The adapter at '{path.name}' holds no LoRA weights.")
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    r_cfg = cfg.get("r")
    alpha = cfg.get("lora_alpha", r_cfg)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise InvalidInputError(f"The adapter at '{path.name}' lacks a LoRA A or B matrix for {module_name}.")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise InvalidInputError(
                f"The adapter at '{path.name}' targets '{module_name}', which this base model does not have."
            ) from None
        if not isinstance(module, nn.Linear) or module is out_layer:
            raise NotRoutableError(f"'{module_name}' is not a routed linear layer")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or a.shape[1] != module.in_features:
            raise InvalidInputError(f"The adapter at '{path.name}' has LoRA shapes that do not fit '{module_name}'.")
        if b.shape[0] != module.out_features:
            raise InvalidInputError(f"The adapter at '{path.name}' has LoRA shapes that do not fit '{module_name}'.")
        if isinstance(r_cfg, int) and r != r_cfg:
            raise NotRoutableError(f"'{module_name}' has rank {r}, not the configured {r_cfg}")
        scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        layers[module_name] = (a, b * scale)
    return AdapterWeights(str(path), layers)


@dataclass
class _Layer:
    """The stacked LoRA columns of every adapter loaded on one linear layer."""

    a: torch.Tensor  # [C, in]
    b: torch.Tensor  # [out, C]
    col_slot: torch.Tensor  # [C] int32; -1 = free column
    free: list[int] = field(default_factory=list)


@dataclass
class _Loaded:
    """A resident adapter: its slot, its columns per layer, and how many running requests use it."""

    slot: int
    columns: dict[str, list[int]]
    nbytes: int
    refs: int = 0


class LoraRouter:
    """The adapters of one engine's model: loading, LRU eviction, and the per-token routing hooks."""

    def __init__(self, model: nn.Module, max_adapters: int = 8, grow_exact: bool | None = None) -> None:
        """Route adapters on `model` (hooks are added on the first adapter); keep at most `max_adapters` resident."""
        self.model = model
        self.max_adapters = max(1, int(max_adapters))
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        # On CPU, grow to exactly what is needed (memory); with CUDA, double (fewer graph recaptures).
        self.grow_exact = self.device.type != "cuda" if grow_exact is None else grow_exact
        self.step_lock = threading.Lock()  # held by the engine thread during each forward, and by installs
        self._meta = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}
        self._layers: dict[str, _Layer] = {}
        self._hooks: dict[str, Any] = {}
        self._adapters: OrderedDict[str, _Loaded] = OrderedDict()  # LRU, least recent first
        self._rid_slot: dict[str, int] = {}
        self._rid_adapter: dict[str, str] = {}
        # Finished or cancelled requests keep their slot a while: a cancelled one may still be in the next step, and
        # its KV blocks must not be offered for prefix sharing.
        self._retired: OrderedDict[str, int] = OrderedDict()
        self._next_slot = 1
        self.active = False  # True only inside the engine's forward: the hooks leave other forwards alone
        self.token_slots: torch.Tensor | None = None
        self._dirty = 0
        self.on_realloc: Callable[[], None] | None = None
        self._stream: Any = None
        self._static = True
        self.supported = True
        self._step_routed = True  # whether the step being run has adapter tokens
        self.stats = {"adapter_loads": 0, "adapter_evictions": 0, "adapter_tokens": 0, "mixed_steps": 0}

    # -- engine boundary --------------------------------------------------------------------------------
    def attach(self, processor: Any) -> None:
        """Hook a (new) batch processor: token slots, the step lock, no prefix sharing for adapters, graph resets.

        Each built batch writes its tokens' slots; each forward runs under the step lock; adapter requests never
        share prefix-cache blocks; growing the stacked tensors drops the captured CUDA graphs.
        """
        size = int(processor.cache.max_batch_tokens) + 1
        if self.token_slots is None or self.token_slots.numel() < size:
            self.token_slots = torch.zeros(size, dtype=torch.int32, device=self.device)
            self._dirty = 0
        io = processor.inputs_and_outputs
        # Asynchronous batching prepares step N+1 while step N runs: one slot buffer would race, so adapters are
        # then served merged (NotRoutableError at load).
        self.supported = not hasattr(io, "io_pairs")
        self._stream = getattr(io, "compute_stream", None)  # the buffer is written on the stream that reads it
        prepare = io.prepare_batch_tensors

        def prepare_batch_tensors(requests_in_batch: Any, *args: Any, **kwargs: Any) -> None:
            prepare(requests_in_batch, *args, **kwargs)
            self._fill_slots(requests_in_batch)

        io.prepare_batch_tensors = prepare_batch_tensors
        runner = processor.model_runner
        # Captured graphs (or compile) fix the forward's code path, so only eager steps may skip the LoRA matmuls.
        self._static = bool(getattr(runner, "pad_inputs", True))
        compute = runner.compute_batch

        def compute_batch(model: Any, batch_data: dict) -> None:
            with self.step_lock:
                self.active = True
                try:
                    compute(model, batch_data)
                finally:
                    self.active = False

        runner.compute_batch = compute_batch
        cache = processor.cache
        search, mark = cache.search_prefix_match, cache.mark_complete_blocks

        # Prefix blocks are keyed by token ids only; KV computed under one adapter must never serve another.
        def search_prefix_match(request_id: str, prompt_ids: list[int]) -> int:
            return 0 if self.slot_of(request_id) else search(request_id, prompt_ids)

        def mark_complete_blocks(state: Any, complete_blocks: dict[str, int]) -> None:
            if not self.slot_of(state.request_id):
                mark(state, complete_blocks)

        cache.search_prefix_match = search_prefix_match
        cache.mark_complete_blocks = mark_complete_blocks

        def invalidate_graphs() -> None:
            from transformers.generation.continuous_batching.utils import CudaGraphBuffer

            if hasattr(io, "graphs"):
                io.graphs = CudaGraphBuffer()  # the old buffer resets its graphs; new shapes are captured lazily

        self.on_realloc = invalidate_graphs

    def _fill_slots(self, requests_in_batch: list[Any]) -> None:
        """Write each query token's adapter slot into the static index buffer (engine thread, before the forward)."""
        values: list[int] = []
        slots = set()
        for fs in requests_in_batch:
            slot = self.slot_of(fs.state.request_id)
            slots.add(slot)
            values.extend([slot] * fs.query_length)
        buf = self.token_slots
        if buf is None:
            return
        if len(slots) > 1:
            self.stats["mixed_steps"] += 1
        self._step_routed = any(values)
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            self._write_slots(buf, values)

    def _write_slots(self, buf: torch.Tensor, values: list[int]) -> None:
        """Write the step's token slots at the head of the buffer, zeroing what the previous step left beyond."""
        if any(values):
            n = min(len(values), buf.numel())
            self.stats["adapter_tokens"] += sum(1 for v in values if v)
            buf[:n].copy_(torch.tensor(values[:n], dtype=torch.int32))
            if self._dirty > n:
                buf[n : self._dirty].zero_()
            self._dirty = n
        elif self._dirty:
            buf[: self._dirty].zero_()
            self._dirty = 0

    def _hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        """The forward hook of one adapted linear layer."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            layer = self._layers.get(name)
            if not self.active or layer is None or self.token_slots is None:
                return None
            if not (self._static or self._step_routed):
                return None  # an eager step of base tokens only
            x = inputs[0]
            n = x.shape[-2]
            slots = self.token_slots[:n].unsqueeze(-1)  # [n, 1]
            mask = (slots == layer.col_slot).to(x.dtype)  # [n, C]
            return output + nn.functional.linear(nn.functional.linear(x, layer.a) * mask, layer.b)

        return hook

    # -- requests ---------------------------------------------------------------------------------------
    def bind(self, rid: str, adapter: str | None) -> None:
        """Give a request its adapter's slot (loading the adapter if needed); nothing for the bare base."""
        if not adapter:
            return
        for _ in range(3):  # a concurrent load may evict it again between our load and our claim
            with self._meta:
                loaded = self._adapters.get(adapter)
                if loaded is not None:
                    loaded.refs += 1
                    self._adapters.move_to_end(adapter)
                    self._rid_slot[rid], self._rid_adapter[rid] = loaded.slot, adapter
                    return
            self.load(Path(adapter))
        raise OverloadedError("Adapters are being swapped faster than requests can claim them; retry shortly.")

    def slot_of(self, rid: str) -> int:
        """The adapter slot of a request (0 = the bare base)."""
        return self._rid_slot.get(rid) or self._retired.get(rid, 0)

    def unbind(self, rid: str) -> None:
        """The request is over: its adapter may be evicted once no other request uses it."""
        with self._meta:
            slot = self._rid_slot.pop(rid, None)
            if slot:
                self._retired[rid] = slot
                while len(self._retired) > 4096:
                    self._retired.popitem(last=False)
            adapter = self._rid_adapter.pop(rid, None)
            loaded = self._adapters.get(adapter) if adapter else None
            if loaded is not None:
                loaded.refs = max(0, loaded.refs - 1)

    # -- loading ----------------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._meta:
            return list(self._adapters)

    def nbytes(self) -> int:
        """Bytes held by the stacked LoRA tensors (all layers, free columns included)."""
        with self._meta:
            return sum(t.numel() * t.element_size() for layer in self._layers.values() for t in (layer.a, layer.b))

    def tensors(self) -> list[torch.Tensor]:
        """The stacked LoRA tensors (for memory accounting)."""
        with self._meta:
            return [t for layer in self._layers.values() for t in (layer.a, layer.b, layer.col_slot)]

    def load(self, path: Path) -> None:
        """Make an adapter resident (once, even under concurrency), evicting the least recently used idle one."""
        key = str(path)
        with self._meta:
            if key in self._adapters:
                self._adapters.move_to_end(key)
                return
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            with self._meta:
                if key in self._adapters:
                    return
            if not self.supported:
                raise NotRoutableError("the engine runs with asynchronous batching")
            weights = read_adapter(path, self.model)  # outside the locks: disk reads never stall a step
            with self._meta:
                while len(self._adapters) >= self.max_adapters:
                    idle = next((k for k, v in self._adapters.items() if v.refs == 0), None)
                    if idle is None:
                        raise OverloadedError(
                            f"All {self.max_adapters} adapter slots of this model are serving requests "
                            "(inference.max_adapters); retry shortly."
                        )
                    self._evict(idle)
                slot = self._next_slot
                self._next_slot += 1
                columns = self._install(slot, weights)
                self._adapters[key] = _Loaded(slot, columns, weights.nbytes)
                self._loading.pop(key, None)
                self.stats["adapter_loads"] += 1
                log.info("adapter %s routed on the shared base as slot %d", path, slot)

    def _evict(self, key: str) -> None:
        """Drop an idle adapter: its columns are zeroed and freed for reuse (in place: graphs stay valid)."""
        loaded = self._adapters.pop(key)
        with self._quiet():
            for name, cols in loaded.columns.items():
                layer = self._layers[name]
                index = torch.tensor(cols, device=self.device)
                layer.col_slot[index] = -1
                layer.a[index] = 0
                layer.b[:, index] = 0
                layer.free.extend(cols)
        self.stats["adapter_evictions"] += 1
        log.info("evicted adapter %s (slot %d)", key, loaded.slot)

    def _install(self, slot: int, weights: AdapterWeights) -> dict[str, list[int]]:
        """Copy an adapter's matrices into free columns of each layer, growing the stacked tensors when needed."""
        grown = False
        columns: dict[str, list[int]] = {}
        with self._quiet():
            for name, (a, b) in weights.layers.items():
                r = a.shape[0]
                layer = self._layers.get(name)
                if layer is None:
                    layer = self._new_layer(name, a.shape[1], b.shape[0])
                if len(layer.free) < r:
                    self._grow(layer, r - len(layer.free))
                    grown = True
                cols = sorted(layer.free)[:r]
                layer.free = [c for c in layer.free if c not in set(cols)]
                index = torch.tensor(cols, device=self.device)
                layer.a[index] = a.to(self.device, self.dtype)
                layer.b[:, index] = b.to(self.device, self.dtype)
                layer.col_slot[index] = slot
                columns[name] = cols
            if grown and self.on_realloc is not None:
                self.on_realloc()
        return columns

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """No step runs meanwhile, and none is still running on the GPU before or after: safe to edit the stacks."""
        with self.step_lock:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            try:
                yield
            finally:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)

    def _new_layer(self, name: str, fan_in: int, fan_out: int) -> _Layer:
        """An empty stack for a linear layer, with its routing hook."""
        layer = _Layer(
            a=torch.zeros(0, fan_in, device=self.device, dtype=self.dtype),
            b=torch.zeros(fan_out, 0, device=self.device, dtype=self.dtype),
            col_slot=torch.zeros(0, dtype=torch.int32, device=self.device),
        )
        self._layers[name] = layer
        self._hooks[name] = self.model.get_submodule(name).register_forward_hook(self._hook(name))
        return layer

    def _grow(self, layer: _Layer, need: int) -> None:
        """Reallocate a layer's stack with room for `need` more columns (new tensors: graphs must be recaptured)."""
        old = layer.col_slot.numel()
        new = old + need if self.grow_exact else max(old + need, 2 * old)
        a = torch.zeros(new, layer.a.shape[1], device=self.device, dtype=self.dtype)
        b = torch.zeros(layer.b.shape[0], new, device=self.device, dtype=self.dtype)
        col_slot = torch.full((new,), -1, dtype=torch.int32, device=self.device)
        a[:old], b[:, :old], col_slot[:old] = layer.a, layer.b, layer.col_slot
        layer.a, layer.b, layer.col_slot = a, b, col_slot
        layer.free.extend(range(old, new))

    def close(self) -> None:
        """Remove the hooks and drop every adapter (the model is the bare base again)."""
        with self._meta, self.step_lock:
            for handle in self._hooks.values():
                handle.remove()
            self._hooks.clear()
            self._layers.clear()
            self._adapters.clear()
