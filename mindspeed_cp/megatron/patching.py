"""A registry of patches keyed by dotted target path: apply once, undo, list.

A :class:`Patch` names what it replaces (``megatron.core.parallel_state.initialize_model_parallel``), a
*wrapper factory* ``make(original) -> replacement`` and one line saying why. Applying replaces the
attribute at its home and in every already-imported module that bound the same object under the same
name (``from x import f`` copies), so callers see the patch whichever way they imported it.

Every patch of the plugin is declared in one list, ``mindspeed_cp.megatron_adaptor.PATCHES``;
``mindspeed-cp patches`` prints it.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

_MISSING = object()


def _copy_function(f: types.FunctionType) -> types.FunctionType:
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__dict__.update(f.__dict__)
    g.__doc__, g.__qualname__, g.__module__ = f.__doc__, f.__qualname__, f.__module__
    return g


def _redirect(f: types.FunctionType, target: Callable) -> Callable[[], None]:
    """Make ``f`` itself call ``target`` (every reference to ``f`` follows); returns the undo."""
    if f.__code__.co_freevars:
        raise ValueError(f"cannot redirect {f.__qualname__} in place: it is a closure")
    slot = f"__mindspeed_cp_redirect_{f.__name__}__"
    namespace: dict = {}
    exec(f"def {f.__name__}(*args, **kwargs):\n    return {slot}(*args, **kwargs)\n", namespace)
    saved = (f.__code__, f.__defaults__, f.__kwdefaults__)
    f.__globals__[slot] = target
    f.__code__, f.__defaults__, f.__kwdefaults__ = namespace[f.__name__].__code__, None, None

    def undo() -> None:
        f.__code__, f.__defaults__, f.__kwdefaults__ = saved
        f.__globals__.pop(slot, None)

    return undo


def wrap(impl: Callable) -> Callable[[Any], Any]:
    """Patch factory: the replacement calls ``impl(original, *args, **kwargs)``."""

    def make(original):
        @functools.wraps(original)
        def replacement(*args, **kwargs):
            return impl(original, *args, **kwargs)

        replacement.__mindspeed_cp_original__ = original
        for attr in ("cache_clear", "cache_info"):  # an lru_cache'd original: its cache stays reachable
            if hasattr(original, attr):
                setattr(replacement, attr, getattr(original, attr))
        return replacement

    return make


def replace(impl: Any) -> Callable[[Any], Any]:
    """Patch factory: the replacement is ``impl`` itself (the original is not needed)."""
    return lambda original: impl


def resolve(target: str) -> Tuple[Any, str]:
    """``"pkg.mod.Class.attr"`` -> (owner object, attribute name). Imports the longest module prefix."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise ImportError(f"cannot import any module prefix of {target!r}")


def _gate(entry) -> bool:
    """Whether a registry entry should apply now: not yet applied and its ``when`` holds (else say why)."""
    if entry.applied:
        return False
    if entry.when is not None and not entry.when():
        entry.status = f"skipped ({entry.when_doc} does not hold)"
        return False
    return True


@dataclass
class Patch:
    """One replacement in a third-party module.

    ``make(original)`` returns the replacement; ``original`` is ``None`` when the attribute does not
    exist yet (``create=True`` patches add something). ``when`` decides at apply time whether the
    patch is needed (e.g. only without an accelerator, only for some Megatron versions). ``versions``: the
    megatron-core releases the target exists in and what differs between them (feature-detected in the
    replacement itself, listed by ``mindspeed-cp patches``; docs/compatibility.md has the table).
    """

    target: str
    make: Callable[[Any], Any]
    why: str
    when: Optional[Callable[[], bool]] = None
    when_doc: str = "always"
    create: bool = False
    versions: str = "all"
    # Also redirect the original function object itself, so names bound before the plugin was imported
    # (`from megatron.core.utils import f` at the top of a user's file) run the replacement too.
    inplace: bool = False
    # filled when applied
    applied: bool = field(default=False, init=False)
    status: str = field(default="not applied", init=False)
    _undo: List[Tuple[Any, str, Any]] = field(default_factory=list, init=False, repr=False)
    _code_undo: Optional[Callable[[], None]] = field(default=None, init=False, repr=False)
    _replacement: Any = field(default=None, init=False, repr=False)

    def apply(self) -> None:
        if not _gate(self):
            return
        try:
            owner, name = resolve(self.target)
        except (ImportError, AttributeError) as e:
            self.status = f"skipped (target absent in this version: {e})"
            return
        original = getattr(owner, name, _MISSING)
        if original is _MISSING and not self.create:
            self.status = "skipped (target absent in this version)"
            return
        inplace = self.inplace and isinstance(original, types.FunctionType)
        if inplace:  # the replacement must call a copy: the original's own code becomes the trampoline
            original = _copy_function(original)
        replacement = self.make(None if original is _MISSING else original)
        if inplace:
            self._code_undo = _redirect(getattr(owner, name), replacement)
            original = getattr(owner, name)
        self._undo = [(owner, name, original)]
        self._replacement = replacement
        setattr(owner, name, replacement)
        if original is not _MISSING and callable(original):
            # `from megatron.core.x import f` elsewhere bound the old object: rebind those names too.
            root = self.target.split(".")[0]
            for mod_name, mod in list(sys.modules.items()):
                if mod is None or mod is owner or not (mod_name == root or mod_name.startswith(root + ".")):
                    continue
                if getattr(mod, "__dict__", {}).get(name, _MISSING) is original:
                    self._undo.append((mod, name, original))
                    setattr(mod, name, replacement)
        self.applied = True
        self.status = "applied" + (f" (+{len(self._undo) - 1} import sites)" if len(self._undo) > 1 else "")

    def undo(self) -> None:
        if self._code_undo is not None:
            self._code_undo()
            self._code_undo = None
        for owner, name, original in reversed(self._undo):
            if original is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, original)
        if self._undo and self._undo[0][2] is not _MISSING and callable(self._undo[0][2]):
            # modules imported after the patch bound the replacement itself (`from x import f`): restore them too
            # (callables only, as apply rebinds: a replaced value such as False is shared by unrelated names)
            owner, name, original = self._undo[0]
            root = self.target.split(".")[0]
            for mod_name, mod in list(sys.modules.items()):
                if (
                    mod is not None
                    and (mod_name == root or mod_name.startswith(root + "."))
                    and getattr(mod, "__dict__", {}).get(name, _MISSING) is self._replacement
                ):
                    setattr(mod, name, original)
        self._undo, self._replacement = [], None
        self.applied = False
        self.status = "not applied"


@dataclass
class Hook:
    """A registry entry that replaces no attribute: ``enter()`` installs something process-wide (e.g. a
    ``TorchFunctionMode``) and returns its undo. Listed, gated and undone like a :class:`Patch`."""

    target: str  # what it hooks, for the listing
    enter: Callable[[], Callable[[], None]]
    why: str
    when: Optional[Callable[[], bool]] = None
    when_doc: str = "always"
    versions: str = "all"
    applied: bool = field(default=False, init=False)
    status: str = field(default="not applied", init=False)
    _leave: Optional[Callable[[], None]] = field(default=None, init=False, repr=False)

    def apply(self) -> None:
        if not _gate(self):
            return
        self._leave = self.enter()
        self.applied, self.status = True, "applied"

    def undo(self) -> None:
        if self._leave is not None:
            self._leave()
            self._leave = None
        self.applied, self.status = False, "not applied"


class PatchRegistry:
    """Ordered patches, keyed by target. Applying twice is a no-op; undo restores every original."""

    def __init__(self) -> None:
        self._patches: Dict[str, Patch] = {}

    def add(self, patch: "Patch | Hook") -> "Patch | Hook":
        if patch.target in self._patches:
            raise ValueError(f"two patches for {patch.target}: merge them into one")
        self._patches[patch.target] = patch
        return patch

    def __iter__(self):
        return iter(self._patches.values())

    def __len__(self) -> int:
        return len(self._patches)

    def __getitem__(self, target: str) -> Patch:
        return self._patches[target]

    def apply_all(self) -> None:
        for p in self._patches.values():
            p.apply()

    def undo_all(self) -> None:
        for p in reversed(list(self._patches.values())):
            p.undo()

    @property
    def applied(self) -> bool:
        return any(p.applied for p in self._patches.values())

    def table(self) -> List[Dict[str, str]]:
        return [
            {"target": p.target, "why": p.why, "when": p.when_doc, "status": p.status, "versions": p.versions}
            for p in self._patches.values()
        ]

    def format(self) -> str:
        rows = self.table()
        width = max((len(r["target"]) for r in rows), default=10)
        lines = [f"{'target'.ljust(width)}  status / when / megatron-core versions / why"]
        for r in rows:
            lines.append(f"{r['target'].ljust(width)}  [{r['status']}] ({r['when']}) megatron-core {r['versions']}")
            lines.append(f"{''.ljust(width)}  {r['why']}")
        return "\n".join(lines)
