"""Adapter validation for the sample pre-commit hook: finite values, a config that matches the
tensors as PEFT reads it, and shapes that fit the base.

`mintvcs commit` runs these same checks in-process, during encoding, when the installed
pre-commit hook is byte-identical to the shipped sample (see mintvcs.hooks.is_sample).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mintvcs.adapter import CONFIG_FILE, read_adapter
from mintvcs.base import bdlora_blocks
from mintvcs.codec import NonFiniteTensorError, nonfinite_count
from mintvcs.errors import MintError

if TYPE_CHECKING:
    from mintvcs.store import Repository

__all__ = [
    "AdapterConfigError",
    "NonFiniteTensorError",
    "PatternKeys",
    "check_finite",
    "check_lora_config",
    "init_lora_weights_error",
    "main",
    "validate_adapter",
]


def check_finite(name: str, dtype: str, raw: bytes | memoryview) -> None:
    """Refuse a float tensor holding NaN or Inf, naming it and counting the bad values."""
    bad = nonfinite_count(raw, dtype)
    if bad:
        raise NonFiniteTensorError(name, bad)


def validate_adapter(adapter_dir: Path, repo: Repository | None) -> None:
    """Run every check on an adapter directory."""
    adapter = read_adapter(adapter_dir)
    shapes = {t.name: (t.dtype, t.shape) for t in adapter.layout.tensors}
    check_lora_config(adapter.config, shapes)
    for index, entry in enumerate(adapter.layout.tensors):
        check_finite(entry.name, entry.dtype, adapter.tensor_bytes(index))
    if repo is not None and repo.base is not None:
        repo.base.check_adapter(shapes, adapter.config)


class AdapterConfigError(MintError):
    """An adapter_config.json that PEFT would reject, or read so that it ignores some tensors."""


# PEFT saves LoRA factors as `base_model.model.<module path>.lora_{A,B}.weight`; the module path
# is what PEFT matches target_modules, rank_pattern and layers_to_transform against.
_PEFT_PREFIX = "base_model.model."
# PEFT also loads factors that keep its default adapter name (`lora_A.default.weight`, what a
# filtered model.state_dict() holds); under any other name it skips them.
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALL_LINEAR = "all-linear"
_RESAVE = "or re-save the adapter with PEFT's save_pretrained"


def check_lora_config(
    config: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    """Refuse a LoRA config whose keys PEFT would fail on or read so as to skip or misfit a tensor."""
    if not isinstance(config, dict):
        raise AdapterConfigError(
            f"{CONFIG_FILE} holds a JSON {type(config).__name__}, not an object: "
            f"write the LoraConfig that PEFT saved, {_RESAVE}"
        )
    if "peft_type" not in config:
        raise AdapterConfigError(
            f'{CONFIG_FILE} has no "peft_type": add "peft_type": "LORA", {_RESAVE}'
        )
    if config["peft_type"] != "LORA":
        return  # only LoRA's rules are known here; read_adapter decides which types are stored
    init_error = init_lora_weights_error(config.get("init_lora_weights", True))
    if init_error is not None:
        raise AdapterConfigError(f"{CONFIG_FILE}: {init_error}")
    rank = _config_rank(config)
    rank_pattern = _rank_pattern(config)
    target_parameters = _str_list(config, "target_parameters")
    _check_target_keys(config, target_parameters)
    rank_keys = PatternKeys(rank_pattern)
    names = (
        _ModuleNames(config.get("target_modules") or []),
        _ModuleNames(config.get("exclude_modules") or []),
    )
    for module, factor_a, factor_b in _factors(tensors):
        key = module.removeprefix(_PEFT_PREFIX)
        # A lone factor is still checked: PEFT would load it beside a freshly initialised partner.
        first = factor_a or factor_b
        if first is None:
            continue  # a module is listed only with at least one factor
        name, shape = first
        # BD-LoRA saves a block-diagonal lora_B as its blocks, stacked: [out, r / nblocks].
        b_blocks = bdlora_blocks(config, key)[1]
        rows = shape[0] if factor_a else shape[1] * b_blocks
        by_parameter = _targets_parameter(key, target_parameters)
        if not by_parameter:
            _check_targeted(config, key, name, names)
        if factor_a and factor_b and factor_b[1][1] * b_blocks != rows:
            raise AdapterConfigError(
                f"{name} has {rows} rows but {factor_b[0]} has {factor_b[1][1]} columns; PEFT "
                f'needs both to be the rank "r" gives {key}: {_RESAVE.removeprefix("or ")}'
            )
        pattern = rank_keys.first(key)
        if pattern is None:
            want, source = rank, '"r"'
        else:
            want, source = rank_pattern[pattern], f'"rank_pattern"[{pattern!r}]'
        # A LoRA on a parameter (target_parameters) stacks one rank-r block per expert.
        fits = rows % want == 0 if by_parameter else rows == want
        if not fits:
            fix = (
                f"set {source} to {rows}"
                if pattern
                else f'set "r" to {rows} or add "rank_pattern": {{{json.dumps(key)}: {rows}}}'
            )
            raise AdapterConfigError(
                f"{CONFIG_FILE}: {source} is {want} but {name} has rank {rows} "
                f"(shape {list(shape)}), so PEFT cannot load it: {fix}, {_RESAVE}"
            )


# The init_lora_weights names PEFT's LoraLayer.update_layer takes exactly as written (besides
# "pissa"/"pissa_niter_N", "corda..." by prefix, and "olora", "mica", "gaussian" in any case).
_INIT_NAMES = ("eva", "orthogonal", "lora_ga", "loftq")
_INIT_CASELESS = ("olora", "mica", "gaussian")


def init_lora_weights_error(init: object) -> str | None:
    """Why PEFT (LoraLayer.update_layer, which runs again when it loads an adapter) fails on
    this init_lora_weights, with the fix; None for a value it loads.

    The rules are PEFT's own: a false value does nothing and true is the default init; a string
    is one of its init names (case matters but for olora, mica and gaussian), "pissa" or
    "pissa_niter_N", or starts with "corda"; anything else raises ("Unknown initialization").
    """
    if not init or init is True:
        return None
    if isinstance(init, str):
        if init.startswith("pissa"):
            if init == "pissa":
                return None
            parts = init.split("_niter_")  # PEFT's parse: one "_niter_", then int()
            if len(parts) == 2:
                try:
                    int(parts[1])
                    return None
                except ValueError:
                    pass
        elif init.startswith("corda") or init.lower() in _INIT_CASELESS or init in _INIT_NAMES:
            return None
    what = f"init_lora_weights is {json.dumps(init, default=repr)}, which PEFT cannot load"
    names = ", ".join(json.dumps(n) for n in ("pissa", *_INIT_CASELESS, *_INIT_NAMES, "corda"))
    if isinstance(init, str) and init.lower() != init and not init_lora_weights_error(init.lower()):
        return f'{what} (its init names are lower case): write "{init.lower()}", as PEFT saves it'
    return (
        f'{what}: it takes the JSON booleans true and false, {names} or "pissa_niter_N"; for '
        "factors trained from the unmodified base weights, write true"
    )


def _config_rank(config: dict[str, Any]) -> int:
    """The config's "r": an int of at least 1."""
    if "r" not in config:
        raise AdapterConfigError(f'{CONFIG_FILE} has no "r": add the LoRA rank, e.g. "r": 8')
    rank = config["r"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "r" is {json.dumps(rank)}; it must be an integer of at least 1, '
            "the rank of the lora_A/lora_B tensors"
        )
    return rank


def _rank_pattern(config: dict[str, Any]) -> dict[str, int]:
    """The config's "rank_pattern" (regex -> rank), checked; empty when absent."""
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "rank_pattern" is {json.dumps(pattern)}; it must map module '
            'patterns to ranks, e.g. {"v_proj": 4}'
        )
    for regex, value in pattern.items():
        _compile(regex, "rank_pattern")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AdapterConfigError(
                f'{CONFIG_FILE}: "rank_pattern"[{regex!r}] is {json.dumps(value)}; '
                "it must be an integer of at least 1"
            )
    return pattern


# A key of word characters and dots matches, as a regex, only strings of its own length whose
# characters equal its own where it has no dot.
_PLAIN_KEY = re.compile(r"[\w.]+")


class PatternKeys:
    """A rank_pattern/alpha_pattern's keys, ready to match many modules: PEFT tries each key's
    regex in order, and a key per module (as PEFT's EVA init saves, thousands for an MoE
    adapter) made that quadratic (10,080 modules: 11 s). Plain keys are looked up instead."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.keys = list(patterns)
        # Plain keys by length, then by their dots' positions: the key itself, found from a
        # module's suffix with those positions turned to dots -> the first such key's index.
        self._plain: dict[int, dict[tuple[int, ...], dict[str, int]]] = {}
        self._regexes: list[tuple[int, re.Pattern[str]]] = []  # every other key, in order
        for index, key in enumerate(self.keys):
            if _PLAIN_KEY.fullmatch(key):
                dots = tuple(i for i, c in enumerate(key) if c == ".")
                by_dots = self._plain.setdefault(len(key), {})
                by_dots.setdefault(dots, {}).setdefault(key, index)
            else:
                self._regexes.append((index, re.compile(rf"(.*\.)?({key})$")))

    def first(self, module: str) -> str | None:
        r"""The first key whose regex `(.*\.)?(KEY)$` matches `module` from its start, or None."""
        best = len(self.keys)
        # A plain key matches the whole path or a part after one of its dots.
        for start in (0, *(i + 1 for i, c in enumerate(module) if c == ".")):
            suffix = module[start:]
            for dots, keys in self._plain.get(len(suffix), {}).items():
                chars = list(suffix)
                for i in dots:
                    chars[i] = "."
                index = keys.get("".join(chars))
                if index is not None and index < best:
                    best = index
        for index, regex in self._regexes:
            if index >= best:
                break
            if regex.match(module):
                best = index
                break
        return self.keys[best] if best < len(self.keys) else None


def _str_list(config: dict[str, Any], field: str) -> list[str]:
    """A config field that must be null or a list of strings."""
    value = config.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "{field}" is {json.dumps(value)}; it must be a list of names or null'
        )
    return value


def _compile(regex: str, field: str) -> re.Pattern[str]:
    """A config regex, or a refusal naming the field."""
    try:
        return re.compile(regex)
    except re.error as err:
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "{field}" has an invalid regex {regex!r} ({err}): fix the pattern'
        ) from None


def _check_target_keys(config: dict[str, Any], target_parameters: list[str]) -> None:
    """Refuse target_modules / layers_* values that PEFT's LoraConfig itself rejects."""
    targets = config.get("target_modules")
    if targets is None:
        if target_parameters:
            return  # PEFT allows a LoRA on parameters alone
        missing = "no" if "target_modules" not in config else "a null"
        raise AdapterConfigError(
            f'{CONFIG_FILE} has {missing} "target_modules": list the modules the LoRA tensors '
            'are on, e.g. ["q_proj", "v_proj"]'
        )
    if isinstance(targets, str):
        if targets.lower() != _ALL_LINEAR:
            _compile(targets, "target_modules")
        for field in ("layers_to_transform", "layers_pattern"):
            if config.get(field) is not None:
                raise AdapterConfigError(
                    f'{CONFIG_FILE}: "{field}" cannot be used with a regex "target_modules" '
                    f"({targets!r}), PEFT rejects that config: remove {field} or list the modules"
                )
    else:
        _str_list(config, "target_modules")
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "layers_to_transform" is {json.dumps(layers)}; it must be a layer '
            "index or a list of them"
        )
    pattern = config.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str):
        _str_list(config, "layers_pattern")
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        _compile(exclude, "exclude_modules")
    else:
        _str_list(config, "exclude_modules")
    for name in _str_list(config, "modules_to_save"):
        _compile(rf"(^|.*\.){name}($|\..*)", "modules_to_save")
    if pattern and layers is None:
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "layers_pattern" is set but "layers_to_transform" is not, PEFT '
            'rejects that config: set "layers_to_transform" or remove "layers_pattern"'
        )


def _shown(names: list[str], most: int = 200) -> str:
    """A config list as JSON, cut short past `most` characters (one may list every module)."""
    text = json.dumps(names)
    return text if len(text) <= most else f"{text[: most - 1]}… ({len(names)} names)"


class _ModuleNames:
    """target_modules or exclude_modules, ready to test many modules: a regex, or a list as a set
    (a list of every module's full name, tens of thousands for an MoE adapter, was scanned once
    per module)."""

    def __init__(self, names: str | list[str]) -> None:
        self.regex = names if isinstance(names, str) else None
        self.names = frozenset(() if isinstance(names, str) else names)

    def match(self, key: str) -> bool:
        """PEFT's test: the regex's full match; or the key itself, or a part after one of its dots, listed."""
        if self.regex is not None:
            return re.fullmatch(self.regex, key) is not None
        return key in self.names or any(
            key[i + 1 :] in self.names for i, c in enumerate(key) if c == "."
        )


def _targets_parameter(key: str, target_parameters: list[str]) -> bool:
    """Whether module `key` owns a parameter that target_parameters names (exact or suffix)."""
    # PEFT nests a ParamWrapper per targeted parameter of one module behind base_layer.
    owner = re.sub(r"(\.base_layer)+$", "", key)
    for target in target_parameters:
        module = target.rpartition(".")[0]
        if module and (owner == module or owner.endswith(f".{module}")):
            return True
    return False


def _tied_to_embedding(config: dict[str, Any], targets: str | list[str], key: str) -> bool:
    """Whether PEFT gives `key` the embedding's LoRA: lm_head under ensure_weight_tying, embedding targeted."""
    # On a tied base PEFT adapts embed_tokens and ties lm_head's LoRA to it, saving both, though
    # lm_head is in no target_modules (PEFT fills target_modules_to_tie in on load).
    if not config.get("ensure_weight_tying") or key.rpartition(".")[2] != "lm_head":
        return False
    if isinstance(targets, str):
        # PEFT's test: the regex on the bare name.
        return re.fullmatch(targets, "embed_tokens") is not None
    return any(isinstance(name, str) and name.split(".")[-1] == "embed_tokens" for name in targets)


def _check_targeted(
    config: dict[str, Any], key: str, tensor: str, names: tuple[_ModuleNames, _ModuleNames]
) -> None:
    """Refuse LoRA factors on a module that PEFT, reading this config, would not give a LoRA
    (`names`: the config's target_modules and exclude_modules, prepared once per config)."""
    refuse = f"so PEFT would ignore {tensor}"
    target_names, exclude = names
    if exclude.match(key):
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "exclude_modules" excludes {key}, {refuse}: '
            "remove it from exclude_modules"
        )
    for name in _str_list(config, "modules_to_save"):
        if re.match(rf"(^|.*\.){name}($|\..*)", key):
            raise AdapterConfigError(
                f'{CONFIG_FILE}: "modules_to_save" entry {name!r} covers {key}, which PEFT then '
                f"never gives a LoRA, {refuse}: remove {name!r} from modules_to_save"
            )
    targets = config.get("target_modules")
    if targets is None:
        targets = []
    if _tied_to_embedding(config, targets, key):
        return
    if isinstance(targets, str):
        if targets.lower() == _ALL_LINEAR or target_names.match(key):
            return
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "target_modules" regex {targets!r} does not fully match {key}, '
            f"{refuse}: widen the regex to match the module path"
        )
    if not target_names.match(key):
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "target_modules" {_shown(targets)} does not cover {key}, '
            f'{refuse}: add "{key.rpartition(".")[2]}" to target_modules'
        )
    layers = config.get("layers_to_transform")
    if layers is None or layers == [] or key in target_names.names:
        # PEFT (check_target_module_exists) applies layers_to_transform only to a module it
        # matched by a suffix: one listed by its whole path (lm_head, say) is always targeted.
        return
    index = _layer_index(key, config.get("layers_pattern"))
    wanted = [layers] if isinstance(layers, int) else layers
    if index is None or index not in wanted:
        found = "has no layer index" if index is None else f"is in layer {index}"
        raise AdapterConfigError(
            f'{CONFIG_FILE}: "layers_to_transform" is {json.dumps(layers)} but {key} {found}, '
            f"{refuse}: add {index if index is not None else 'its layer'} to layers_to_transform "
            "(or fix layers_pattern)"
        )


def _layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer index PEFT reads from module `key`: the first number after layers_pattern."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match["idx"]) if match else None


_Factor = tuple[str, tuple[int, ...]]


def _factors(
    tensors: dict[str, tuple[str, tuple[int, ...]]],
) -> list[tuple[str, _Factor | None, _Factor | None]]:
    """(module, (lora_A name, shape) or None, (lora_B name, shape) or None), sorted by module."""
    factors: dict[str, dict[str, _Factor]] = {}
    for name, (_dtype, shape) in tensors.items():
        match = _FACTOR.match(name)
        if match is None:
            continue  # DoRA magnitudes, embedding LoRA, modules_to_save copies, biases
        if len(shape) < 2:
            raise AdapterConfigError(
                f"{name} has shape {list(shape)}; a LoRA factor has at least 2 dimensions: "
                f"{_RESAVE.removeprefix('or ')}"
            )
        adapter = match["adapter"]
        if adapter not in (None, "default"):
            raise AdapterConfigError(
                f"{name} carries the adapter name {adapter!r}; PEFT loads such a tensor only as "
                f"'default' and would skip it: {_RESAVE.removeprefix('or ')}"
            )
        pair = factors.setdefault(match["module"], {})
        if match["kind"] in pair:
            raise AdapterConfigError(
                f"{name} and {pair[match['kind']][0]} are the same factor; keep one of them"
            )
        pair[match["kind"]] = (name, shape)
    return [(module, pair.get("A"), pair.get("B")) for module, pair in sorted(factors.items())]


def main() -> int:
    """Validate MINT_ADAPTER_DIR (or argv[1]) against the repository in MINT_DIR."""
    from mintvcs.store import Repository

    target = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MINT_ADAPTER_DIR", "."))
    git_dir = os.environ.get("MINT_DIR")
    try:
        validate_adapter(target, Repository.open(git_dir) if git_dir else None)
    except MintError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
