"""Adapter revisions on their way in: where they come from (a source), and their decoded host form.

The byte path: store (or a PEFT directory) -> `AdapterSource.load` -> `prepare_adapter` (validate,
refuse what we do not serve, convert to the engine dtype) -> `slots.AdapterPools.stage` (one host
buffer in the slots' memory order; `HostAdapter.check_finite` runs over it) -> `HostAdapter` in
the host cache -> `slots.AdapterPools.write` into a device slot.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mintvcs.adapter import adapter_paths
from mintvcs.errors import MintError, NewerFormatError
from mintvcs.ids import is_object_id
from mintvcs.safetensors_file import CorruptSafetensorsError
from mintvcs.serve.loader import ModelConfig
from mintvcs.serve.model import LORA_MODULES
from mintvcs.validate import PatternKeys, init_lora_weights_error

# PEFT's tensor names, with or without its default adapter name ("lora_A.default.weight"), as PEFT
# loads them; factors under another adapter name PEFT skips, so the engine refuses them.
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\."
    r"(?P<module>\w+)\.lora_(?P<kind>[AB])(?:\.default)?\.weight$"
)
# VeLoRA's saved projection buffer: it enters only the backward pass (PEFT's VeLoRA forward
# outside training is a plain LoRA), so a VeLoRA revision is served as its factors.
_VELORA_BUFFER = re.compile(r"\.lora_velora_embed(?:\.default)?$")
# LoraConfig's default lora_alpha: a config that leaves it out is scaled as PEFT scales it.
_PEFT_DEFAULT_ALPHA = 8
# LoraConfig keys of LoRA variants whose forward is not a plain LoRA: key -> (reason, detail).
_VARIANTS = {
    "alora_invocation_tokens": (
        "alora",
        "activated LoRA (aLoRA) applies the adapter only from its invocation tokens on; the engine "
        "does not serve aLoRA yet and would apply it to every token",
    ),
    "use_bdlora": (
        "bdlora",
        "BD-LoRA (block-diagonal lora_A or lora_B) is not supported; retrain as a plain LoRA",
    ),
    "kasa_config": (
        "kasa",
        "KaSA (a trained lora_diag between A and B, on a truncated base weight) is not supported",
    ),
    "monteclora_config": (
        "monteclora",
        "MonteCLoRA (sampled LoRA factors) is not supported; retrain as a plain LoRA",
    ),
    "arrow_config": (
        "arrow",
        "Arrow (routing among several task adapters) is not supported; serve each adapter alone",
    ),
}
# The fix for an init that PEFT redoes on the base weights at load (PiSSA, OLoRA, CorDA): PEFT's
# own conversion, which folds the base's change into the factors.
_CONVERT = (
    "re-save the trained model with save_pretrained(..., "
    "path_initial_model_for_weight_conversion=DIR), which writes a plain LoRA (rank 2r) of the "
    "original base"
)
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class AdapterRefused(MintError):
    """A revision the engine will not serve; `reason` is a short code (dora, rank, base_fingerprint, ...)."""

    def __init__(
        self, revision: str, reason: str, detail: str, *, base_fingerprint: str | None = None
    ) -> None:
        self.revision = revision
        self.reason = reason
        # The base the revision was committed against, where the refusal knows it (too_large):
        # the engine then names another base as the cause instead.
        self.base_fingerprint = base_fingerprint
        super().__init__(f"revision {revision[:12]} refused ({reason}): {detail}")


class AdapterNotFound(MintError):
    """The source has no revision of that name or id."""


@dataclass(frozen=True)
class AdapterWeights:
    """One revision as a source hands it over: PEFT config and PEFT-named tensors."""

    revision: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    base_fingerprint: str | None = None


class AdapterSource(Protocol):
    """Where revisions come from: resolve a ref or name to an id, load an id's weights.

    An id names fixed weights: the adapter slots, the host cache and the prefix cache (whose
    keys and values a k/v LoRA changes) keep what they hold under the id.
    """

    def resolve(self, spec: str) -> str:
        """The revision id `spec` names now (a ref may move; the id's weights may not)."""
        ...

    def load(self, revision: str, *, max_bytes: int | None = None) -> AdapterWeights:
        """Read and decode one revision; AdapterRefused("too_large") past max_bytes of tensors.

        Before refusing a revision as too large, a source runs `refuse_unserved` on its config
        and tensor names, so that the refusal names the real cause when there is one.
        """
        ...


def _too_large(
    revision: str, held: str, max_bytes: int, base_fingerprint: str | None = None
) -> AdapterRefused:
    return AdapterRefused(
        revision,
        "too_large",
        f"{held}, more than any adapter this engine serves "
        f"({max_bytes} bytes: max_lora_rank on every targeted linear)",
        base_fingerprint=base_fingerprint,
    )


# The resident base's fingerprint, or every fingerprint it answers to (the current one first,
# then those older versions recorded for it: mintvcs.base.fingerprints).
BaseFingerprint = str | tuple[str, ...] | None


def refuse_other_base(revision: str, committed_on: str | None, resident: BaseFingerprint) -> None:
    """AdapterRefused("base_fingerprint") if the revision was committed against another base
    than the resident one (either unknown: nothing to compare)."""
    accepted = (resident,) if isinstance(resident, str) else resident or ()
    if accepted and committed_on and committed_on not in accepted:
        raise AdapterRefused(
            revision,
            "base_fingerprint",
            f"it was committed against base {committed_on[:19]}, the resident base is "
            f"{accepted[0][:19]}; serve it with its own base",
        )


class PeftDirSource:
    """Revisions that are PEFT directories (adapter_config.json + adapter_model.safetensors), by name."""

    def __init__(
        self,
        directories: Mapping[str, Path | str] | None = None,
        *,
        base_fingerprint: str | None = None,
    ):
        self.directories: dict[str, Path] = {k: Path(v) for k, v in (directories or {}).items()}
        self.base_fingerprint = base_fingerprint

    def add(self, name: str, directory: Path | str) -> None:
        """Register `directory` under revision id `name`; ValueError if `name` names another.

        A name is an id, and an id names fixed weights: an engine that served `name` keeps its
        adapter and the keys and values its prompts gave under that name, and rebinding it
        would mix the two adapters' outputs. Add the new directory under a new name.
        """
        path = Path(directory)
        known = self.directories.get(name)
        if known is not None and known.resolve() != path.resolve():
            raise ValueError(
                f"adapter name {name!r} already names {str(known)!r}, not {str(path)!r}: a "
                "name is a revision id and must keep naming the same weights; use a new name"
            )
        self.directories[name] = path

    def resolve(self, spec: str) -> str:
        """A name is its own id; an unknown name is an error."""
        if spec not in self.directories:
            raise AdapterNotFound(
                f"no adapter named {spec!r}; known: {', '.join(sorted(self.directories)) or 'none'}"
            )
        return spec

    def load(self, revision: str, *, max_bytes: int | None = None) -> AdapterWeights:
        """Read the directory's config and safetensors (refused past max_bytes, by file size)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        directory = self.directories.get(revision)
        if directory is None:
            raise AdapterNotFound(f"no adapter named {revision!r}")
        try:
            config_path, weights = adapter_paths(directory)  # the hints a commit gives
        except MintError as err:
            raise AdapterNotFound(f"adapter {revision!r}: {err}") from None
        config = json.loads(config_path.read_text())
        size = weights.stat().st_size
        # safetensors' own message ("header too large") names neither the adapter nor the file.
        try:
            if max_bytes is not None and size > max_bytes:
                # The real cause first: a copy of a whole base layer is refused as such.
                with safe_open(str(weights), framework="pt") as header:  # reads the header only
                    refuse_unserved(revision, config, header.keys())
                raise _too_large(revision, f"{weights} holds {size} bytes", max_bytes)
            tensors = load_file(str(weights))
        except SafetensorError as err:
            raise CorruptSafetensorsError(
                f"adapter {revision!r}: {weights} is not a readable safetensors file: {err}"
            ) from None
        return AdapterWeights(revision, config, tensors, self.base_fingerprint)


# The plane cache's default bound, in revisions of the largest size loaded so far: the last
# revision of one or two branches in training. A larger bound costs fresh memory (page faults:
# tens of ms per revision) until it fills, and helps only when more branches are followed.
PLANE_CACHE_REVISIONS = 2


class StoreSource:
    """Revisions from a mintvcs repository: ids are commit ids, never ref names."""

    def __init__(self, repo: Any, *, plane_cache_bytes: int | None = None) -> None:
        """Read revisions from `repo` (a Repository or its path), keeping decoded XOR tips so
        that a revision committed on top of one loaded before decodes one link of its chain,
        not all of them: up to `plane_cache_bytes` (0: none; None: PLANE_CACHE_REVISIONS of the
        largest revision loaded so far). This sets the Repository's plane_cache: give a
        Repository object only if this source is its one reader."""
        from mintvcs.plane_cache import PlaneCache

        self._owns_repo = isinstance(repo, (str, Path))  # opened here: closed by close()
        if isinstance(repo, (str, Path)):
            from mintvcs.store import Repository

            repo = Repository.open(repo)
        self.repo = repo
        self._auto_bound = plane_cache_bytes is None
        repo.plane_cache = PlaneCache(plane_cache_bytes or 0) if plane_cache_bytes != 0 else None

    def close(self) -> None:
        """Release the pack files of the repository this source opened from a path (the
        Engine calls it when it closes); a Repository given is the caller's to close."""
        if self._owns_repo:
            self.repo.close()

    def resolve(self, spec: str) -> str:
        """The commit id a ref, tag or abbreviated id names now."""
        return str(self.repo.resolve(spec))

    def load(self, revision: str, *, max_bytes: int | None = None) -> AdapterWeights:
        """Decode the commit's tensors from the store into torch tensors, refusing more than max_bytes before decoding."""
        if not is_object_id(revision):
            # A ref name or an abbreviation would otherwise read as a corrupt object.
            raise AdapterNotFound(
                f"{revision!r:.60} is not a commit id: revisions are served by full commit id; "
                "resolve a ref or an abbreviation first (Engine.resolve)"
            )
        from mintvcs.store import CorruptObjectError

        try:
            return self._load(revision, max_bytes)
        except NewerFormatError as err:
            # Its manifest or a blob is of a newer format: a property of the revision, like the
            # other refusals (a retry gets the same answer), not a fault of the server's store.
            raise AdapterRefused(revision, "newer_format", str(err)) from None
        except CorruptObjectError:
            # A commit pruned since it was resolved (its ref deleted, then gc) is not there to
            # serve; a commit that is there with objects missing is damage, and says so.
            if self.repo.has_object(revision, rescan=True):
                raise
        raise AdapterNotFound(
            f"revision {revision[:12]} is not in the repository: never committed there, or "
            "pruned since (its ref deleted, then gc)"
        )

    def _load(self, revision: str, max_bytes: int | None) -> AdapterWeights:
        rev = self.repo.read_revision(revision)
        if max_bytes is not None and rev.manifest.nbytes > max_bytes:
            # The real cause first: a copy of a whole base layer is refused as such (and the
            # engine names another base before either).
            try:
                refuse_unserved(
                    rev.commit, rev.config, (record.name for record in rev.manifest.tensors)
                )
            except AdapterRefused as err:
                err.base_fingerprint = rev.base_fingerprint
                raise
            raise _too_large(
                rev.commit,
                f"its tensors hold {rev.manifest.nbytes} bytes",
                max_bytes,
                rev.base_fingerprint,
            )
        cache = self.repo.plane_cache
        if self._auto_bound and cache is not None:
            cache.max_bytes = max(cache.max_bytes, PLANE_CACHE_REVISIONS * rev.manifest.nbytes)
        tensors: dict[str, torch.Tensor] = {}
        items = []
        for record in rev.manifest.tensors:
            torch_dtype = _SAFETENSORS_DTYPES.get(record.dtype)
            if torch_dtype is None:
                raise AdapterRefused(
                    rev.commit,
                    "dtype",
                    f"tensor {record.name} has dtype {record.dtype}; use F32, F16 or BF16",
                )
            # Each tensor is decoded straight into its own torch storage: no bytes objects and no
            # whole-revision buffer in between. Per-tensor blocks (64-180 kB for r=16) come back
            # from the allocator's free lists on the next load, where a fresh 33 MB buffer would
            # be page-faulted in every time (the dominant cost of a cold load on a VM).
            tensor = torch.empty(record.shape, dtype=torch_dtype)
            if tensor.numel():
                items.append((record, tensor.view(-1).view(torch.uint8).numpy()))
            tensors[record.name] = tensor
        # One call for the revision: the store decodes while a second thread verifies sha256s.
        self.repo.tensors_into(items)
        return AdapterWeights(rev.commit, dict(rev.config), tensors, rev.base_fingerprint)


# Per layer, per fused group (model.LORA_GROUPS) the revision adapts: A^T [in, P*r] and, per slice,
# B^T [r, width_i] (None for a module it does not adapt); r is the revision's rank.
PackedImage = list[dict[str, tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]]]


@dataclass
class HostAdapter:
    """A validated revision in host memory: per (layer, module) A [r, in], B [out, r], ready to copy to a slot."""

    revision: str
    rank: int  # the largest rank over its modules; the slot's real rank
    scale: float  # the slot scale; modules whose own scale differs carry the ratio folded into B
    modules: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Set by slots.AdapterPools.stage: one flat buffer that owns every factor (`weights` are views
    # into it) and, for packed pools, the slot's exact image inside it, so a swap is whole copies.
    buffer: torch.Tensor | None = None
    packed: PackedImage | None = None

    @property
    def nbytes(self) -> int:
        """Host bytes held by the factors."""
        if self.buffer is not None:
            return self.buffer.numel() * self.buffer.element_size()
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.weights.values()
        )

    def check_finite(self) -> None:
        """Refuse the revision if any factor holds NaN or Inf (one reduction when staged)."""
        # A finite sum proves every element finite (NaN and Inf propagate); only a sum that
        # overflowed or met a non-finite value needs the per-factor search below.
        buffer = self.buffer
        if (
            buffer is not None
            and buffer.is_floating_point()
            and math.isfinite(float(buffer.sum(dtype=torch.float32)))
        ):
            return
        for (layer, module), (a, b) in sorted(self.weights.items()):
            for kind, factor in (("A", a), ("B", b)):
                if factor.is_floating_point() and not bool(torch.isfinite(factor).all()):
                    raise AdapterRefused(
                        self.revision,
                        "non_finite",
                        f"layer {layer} {module} lora_{kind} holds NaN or Inf; "
                        "fix the training run and commit a finite revision",
                    )


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _base_rewrite(init: object) -> str | None:
    """Why a loadable `init_lora_weights` makes PEFT rewrite the base on load, with the fix;
    None if it does not (a value PEFT cannot load is refused before: init_lora_weights_error)."""
    # The tests are PEFT's own (LoraLayer.update_layer): pissa/corda by prefix, olora in any
    # case, loftq exactly. Every other value only initialises factors that the saved ones replace.
    if not isinstance(init, str):
        return None
    if init.startswith("pissa") or init.lower() == "olora":
        what = "PiSSA" if init.startswith("pissa") else "OLoRA"
        return (
            f"{what} (init_lora_weights={init!r}) moves part of each targeted base weight into "
            "the factors, and PEFT redoes that on load: the adapter only works on the rewritten "
            f"base, not on the one served here; {_CONVERT}"
        )
    if init.startswith("corda"):
        return (
            f"CorDA (init_lora_weights={init!r}) moves part of each targeted base weight into the "
            "factors; PEFT cannot redo that on load without preprocess_corda's calibration data; "
            + _CONVERT
        )
    if init == "loftq":
        return (
            "LoftQ (init_lora_weights='loftq') quantizes the base weights again on load: serve the "
            "adapter on the LoftQ backbone it was trained on, with init_lora_weights set to true "
            "in adapter_config.json (as PEFT's LoftQ example saves it)"
        )
    return None


def refuse_unserved(revision: str, config: Mapping[str, Any], names: Iterable[str]) -> None:
    """Refuse what the config or the tensor names alone rule out, whatever the base.

    prepare_adapter runs it; a source runs it before refusing a revision as too large, so that
    an adapter with a full-size copy of a base layer (modules_to_save, lm_head or embedding
    LoRA) is refused for that, not as too large.
    """

    def refuse(reason: str, detail: str) -> AdapterRefused:
        return AdapterRefused(revision, reason, detail)

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise refuse("peft_type", f"peft_type is {peft_type}; only LORA adapters are served")
    if config.get("use_dora"):
        raise refuse("dora", "DoRA (use_dora=true) is not supported; retrain without DoRA")
    for key, (reason, detail) in _VARIANTS.items():
        if config.get(key):
            raise refuse(reason, f"{key} is set: {detail}")
    init = config.get("init_lora_weights", True)
    unloadable = init_lora_weights_error(init)
    if unloadable is not None:
        raise refuse("init_lora_weights", unloadable)
    rewrite = _base_rewrite(init)
    if rewrite is not None:
        raise refuse("init_lora_weights", rewrite)
    if config.get("modules_to_save"):
        raise refuse(
            "modules_to_save",
            f"modules_to_save={config['modules_to_save']} would replace base weights; only LoRA factors are served",
        )
    if config.get("trainable_token_indices"):
        raise refuse(
            "trainable_tokens",
            "trainable_token_indices trains embedding rows; only LoRA factors of linear layers are served",
        )
    if config.get("layer_replication"):
        raise refuse("layer_replication", "layer_replication is not supported")
    names = list(names)
    # Biases go by the tensors, not the config: with bias="all" on a base without biases (Llama)
    # PEFT saves none and runs a plain LoRA.
    for name in names:
        if name.endswith(".bias"):
            kind = "lora_bias" if ".lora_B" in name else "bias"
            raise refuse(
                kind,
                f"tensor {name} is a trained bias ({'lora_bias' if kind == 'lora_bias' else 'bias'}"
                " in the PEFT config); only LoRA factors are served",
            )
    for reason, marks, what in (
        ("embedding_lora", ("lora_embedding", "embed_tokens"), "the embedding"),
        ("lm_head_lora", ("lm_head",), "lm_head"),
    ):
        hits = [n for n in names if any(m in n for m in marks)]
        if hits:
            # Name a LoRA factor, not the full base-layer copy PEFT saves beside it.
            shown = next((n for n in hits if "lora_" in n), hits[0])
            raise refuse(
                reason, f"tensor {shown} adapts {what}; only decoder-layer linears are served"
            )
    velora = bool(config.get("velora_config"))
    for name in names:
        if "lora_magnitude_vector" in name:
            raise refuse("dora", f"tensor {name} is a DoRA magnitude; DoRA is not supported")
        if velora and _VELORA_BUFFER.search(name):
            continue
        if _LORA_KEY.match(name) is None:
            raise refuse("unknown_tensor", f"tensor {name} is not a decoder-layer LoRA factor")


def prepare_adapter(
    weights: AdapterWeights,
    config: ModelConfig,
    *,
    max_rank: int,
    targets: frozenset[str] | tuple[str, ...] = LORA_MODULES,
    base_fingerprint: BaseFingerprint = None,
    dtype: torch.dtype = torch.float32,
    check_finite: bool = True,
) -> HostAdapter:
    """Check a revision against the resident base and the engine's limits; refuse with the reason.

    `check_finite=False` leaves the NaN/Inf check to the caller (the engine runs it once, over the
    staged host buffer: `HostAdapter.check_finite`).
    """
    rev = weights.revision
    cfg = weights.config

    def refuse(reason: str, detail: str) -> AdapterRefused:
        return AdapterRefused(rev, reason, detail)

    refuse_other_base(rev, weights.base_fingerprint, base_fingerprint)
    refuse_unserved(rev, cfg, weights.tensors)
    alpha = float(cfg.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    rslora = bool(cfg.get("use_rslora", False))
    alpha_pattern: Mapping[str, Any] = cfg.get("alpha_pattern") or {}

    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    paths: dict[tuple[int, str], str] = {}
    for name, tensor in weights.tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            continue  # VeLoRA's buffer: refuse_unserved let nothing else through
        layer, module, kind = int(match["layer"]), match["module"], match["kind"]
        # The module's path as PEFT names it when it matches rank_pattern and alpha_pattern keys.
        paths[(layer, module)] = f"model.layers.{layer}.{match['parent']}.{module}"
        if module not in LORA_MODULES:
            raise refuse(
                "target_module", f"module {module} is not one of {', '.join(LORA_MODULES)}"
            )
        if module not in targets:
            raise refuse(
                "target_module",
                f"module {module} has no slot pool in this engine (lora_targets={sorted(targets)}); "
                "add it to EngineConfig.lora_targets",
            )
        if layer >= config.num_hidden_layers:
            raise refuse(
                "shape",
                f"tensor {name} is for layer {layer} but the base has {config.num_hidden_layers} layers",
            )
        parts.setdefault((layer, module), {})[kind] = tensor

    if not parts:
        raise refuse("empty", "the revision holds no LoRA factors")
    ranks: dict[tuple[int, str], int] = {}
    for (layer, module), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise refuse(
                "incomplete",
                f"layer {layer} {module} has lora_{''.join(ab)} only; both A and B are needed",
            )
        a, b = ab["A"], ab["B"]
        out_f, in_f = config.linear_shape(module)
        r = int(a.shape[0]) if a.dim() == 2 else -1
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != in_f
            or b.shape[0] != out_f
            or b.shape[1] != r
        ):
            raise refuse(
                "shape",
                f"layer {layer} {module}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base's "
                f"[{out_f}, {in_f}] linear; the adapter was made for another base",
            )
        if r > max_rank:
            raise refuse(
                "rank",
                f"layer {layer} {module} has rank {r} > max_rank {max_rank}; raise max_lora_rank "
                "(mintvcs serve --max-rank)",
            )
        ranks[(layer, module)] = r

    scales: dict[tuple[int, str], float] = {}
    alpha_keys = PatternKeys(alpha_pattern)
    for key, r in ranks.items():
        pattern = alpha_keys.first(paths[key])
        module_alpha = alpha if pattern is None else float(alpha_pattern[pattern])
        scales[key] = lora_scale(module_alpha, r, rslora)
    rank = max(ranks.values())
    slot_scale = lora_scale(alpha, rank, rslora)
    if slot_scale == 0:
        # lora_alpha=0 switches off only the modules alpha_pattern leaves at 0 (PEFT scales
        # each module on its own): the slot takes a module's non-zero scale, so that the others
        # fold theirs into B as a ratio, 0 included.
        slot_scale = next((v for v in scales.values() if v != 0), 0.0)
    host = HostAdapter(rev, rank, slot_scale, frozenset(m for _, m in parts))
    for key, ab in parts.items():
        module_scale = scales[key]
        a = ab["A"].to(dtype).contiguous()
        b = ab["B"]
        if module_scale != slot_scale:
            # add_lora has one scale per slot: fold this module's own scale into its B.
            b = b.to(torch.float32) * (module_scale / slot_scale)
        host.weights[key] = (a, b.to(dtype).contiguous())
    if check_finite:
        host.check_finite()
    return host
