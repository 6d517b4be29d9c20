"""Which tensor of one stage is which of the next: models that change between stages.

A stage may wrap or rename the model (peft's ``get_peft_model``, ``torch.compile``), add tensors
(adapters, a new head) or drop some. Each stage records its own manifest and, for every tensor
that continues a tensor of the previous stage, that tensor's name there and how the two were
matched (``Continuation``). Recording decides the matching; the analysis composes the stages'
matches to follow every tensor of its model back through the stages in which it existed.

Matching, in order of precedence:

1. ``explicit``: names the user gave (``SourceCallback.next_stage(..., renamed={new: old})``;
   ``old=None`` marks a tensor as new).
2. ``identity``: the same tensor object, when the recording process saw both stages.
3. ``name``: the same name.
4. ``rule``: the same name after removing the components that wrappers insert
   (:data:`WRAPPER_COMPONENTS`): ``_orig_mod`` (``torch.compile``), ``base_model.model``
   (peft's model wrapper) and ``base_layer`` (a layer wrapped by a peft adapter).

peft's ``modules_to_save`` keeps a module twice: the trained copy the model computes with
(``<module>.modules_to_save.<adapter>``) and the frozen original (``<module>.original_module``,
the same tensors as before). The copy continues the module, by ``rule`` and before any other
match but an explicit one; the original is a new tensor.

A match must keep the kind, shape and dtype; one that does not, or a name that several tensors
claim, is an error naming the tensors: nothing is matched silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from source_callback.errors import ManifestMismatchError, listed
from source_callback.manifest import Manifest

#: Name components that wrappers insert, removed before names are compared (rule ``rule``).
WRAPPER_COMPONENTS: tuple[tuple[str, ...], ...] = (
    ("base_model", "model"),
    ("_orig_mod",),
    ("base_layer",),
)

EXPLICIT, IDENTITY, NAME, RULE = "explicit", "identity", "name", "rule"

#: peft's ``ModulesToSaveWrapper``: ``<module>.modules_to_save.<adapter>`` (the trained copy)
#: and ``<module>.original_module`` (the frozen original).
SAVED_COPY, SAVED_ORIGINAL = "modules_to_save", "original_module"


def unwrapped_name(name: str) -> str:
    """``name`` without wrapper components (:data:`WRAPPER_COMPONENTS`).

    Examples
    --------
    >>> unwrapped_name("model.base_model.model.layers.0.q_proj.base_layer.weight")
    'model.layers.0.q_proj.weight'
    >>> unwrapped_name("_orig_mod.head.bias")
    'head.bias'

    """
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for component in WRAPPER_COMPONENTS:
            if tuple(parts[i : i + len(component)]) == component and i + len(component) < len(
                parts
            ):
                i += len(component)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _by_unwrapped_name(names: Iterable[str]) -> dict[str, list[str]]:
    """``names`` grouped by :func:`unwrapped_name`, in their order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(unwrapped_name(name), []).append(name)
    return groups


def saved_copies(current: list[str], previous: list[str]) -> dict[str, str | None]:
    """The matches of peft's ``modules_to_save`` wrappers among ``current``'s names.

    Each trained copy maps to the previous tensor it continues and each frozen original to
    ``None`` (a new tensor); a copy that no previous tensor matches is left to the other rules.

    Examples
    --------
    >>> saved_copies(
    ...     ["m.base_model.model.head.modules_to_save.default.weight",
    ...      "m.base_model.model.head.original_module.weight"],
    ...     ["m.head.weight"],
    ... )  # doctest: +NORMALIZE_WHITESPACE
    {'m.base_model.model.head.modules_to_save.default.weight': 'm.head.weight',
     'm.base_model.model.head.original_module.weight': None}

    """
    by_rule = _by_unwrapped_name(previous)
    found: dict[str, str | None] = {}
    names = set(current)
    for name in current:
        parts = name.split(".")
        for i in range(len(parts) - 2):
            if parts[i] != SAVED_COPY:
                continue
            candidates = by_rule.get(unwrapped_name(".".join(parts[:i] + parts[i + 2 :])), [])
            if len(candidates) == 1:
                found[name] = candidates[0]
                original = ".".join([*parts[:i], SAVED_ORIGINAL, *parts[i + 2 :]])
                if original in names:
                    found[original] = None
            break
    return found


@dataclass(frozen=True)
class Continuation:
    """How a stage's tensors continue the previous stage's.

    Attributes
    ----------
    previous
        This stage's tensor name -> the previous stage's name, for every continued tensor.
    matched_by
        This stage's tensor name -> ``explicit``, ``identity``, ``name`` or ``rule``.
    """

    previous: dict[str, str]
    matched_by: dict[str, str]

    def to_json(self) -> dict[str, list[str]]:
        """Plain-JSON form: ``{name: [previous name, how]}``."""
        return {name: [old, self.matched_by[name]] for name, old in self.previous.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, list[str]]) -> Continuation:
        """Inverse of :meth:`to_json`."""
        return cls(
            {name: entry[0] for name, entry in data.items()},
            {name: entry[1] for name, entry in data.items()},
        )

    @classmethod
    def same_names(cls, manifest: Manifest) -> Continuation:
        """Every tensor continues the one of the same name (stores of format version 1)."""
        names = [e["name"] for e in manifest]
        return cls(dict(zip(names, names, strict=True)), dict.fromkeys(names, NAME))


def _mismatch(new: Mapping[str, Any], old: Mapping[str, Any]) -> str | None:
    for key in ("kind", "shape", "dtype"):
        if new[key] != old[key]:
            return f"{key} {old[key]} in the previous stage, {new[key]} now"
    return None


def match_stages(
    previous: Manifest,
    current: Manifest,
    *,
    identity: Mapping[str, str] | None = None,
    renamed: Mapping[str, str | None] | None = None,
    stage: str = "the new stage",
) -> Continuation:
    """Match the tensors of ``current`` (a new stage's manifest) to those of ``previous``.

    Parameters
    ----------
    previous, current
        The previous stage's manifest and the new stage's.
    identity
        Current name -> previous name of tensors known to be the same object.
    renamed
        Current name -> previous name (or ``None``: a new tensor), given by the user.
    stage
        The new stage's name, for messages.

    Raises
    ------
    ManifestMismatchError
        A match changes a tensor's kind, shape or dtype; several tensors claim one previous
        tensor; ``renamed`` names a tensor that does not exist; or nothing continues.
    """
    old = {e["name"]: e for e in previous}
    new = {e["name"]: e for e in current}
    renamed = dict(renamed or {})
    unknown = [n for n in renamed if n not in new] + [
        o for o in renamed.values() if o is not None and o not in old
    ]
    if unknown:
        raise ManifestMismatchError(
            f"renamed= for stage {stage!r} names tensors the models do not have: {unknown}. "
            "Keys are names in the new stage's model, values names in the previous stage's."
        )
    matches: dict[str, tuple[str, str]] = {
        n: (o, EXPLICIT) for n, o in renamed.items() if o is not None
    }
    explicit = {o for o, _ in matches.values()}
    copies = {
        n: o
        for n, o in saved_copies(list(new), list(old)).items()
        if n not in renamed and o not in explicit
    }
    matches.update((n, (o, RULE)) for n, o in copies.items() if o is not None)
    open_new = [n for n in new if n not in renamed and n not in copies]
    for n in open_new:
        if identity and n in identity and identity[n] in old:
            matches[n] = (identity[n], IDENTITY)
    taken = {o for o, _ in matches.values()}
    unmatched_old = [o for o in old if o not in taken]
    for n in (n for n in open_new if n not in matches and n in unmatched_old):
        matches[n] = (n, NAME)
    taken = {o for o, _ in matches.values()}
    by_rule = _by_unwrapped_name(o for o in old if o not in taken)
    claims: dict[str, list[str]] = {}
    for n in (n for n in open_new if n not in matches):
        candidates = by_rule.get(unwrapped_name(n), [])
        if len(candidates) > 1:
            raise ManifestMismatchError(
                f"tensor {n} of stage {stage!r} could continue any of {candidates} of the "
                "previous stage. Say which with next_stage(..., renamed={new name: old name})."
            )
        if candidates:
            claims.setdefault(candidates[0], []).append(n)
    for o, claimants in claims.items():
        if len(claimants) > 1:
            raise ManifestMismatchError(
                f"tensors {claimants} of stage {stage!r} all continue {o} of the previous stage "
                "by name. Say which one does with next_stage(..., renamed={new name: old name})."
            )
        matches[claimants[0]] = (o, RULE)
    problems = [
        f"{n} (continues {o} by {how}): {why}"
        for n, (o, how) in sorted(matches.items())
        if (why := _mismatch(new[n], old[o])) is not None
    ]
    if problems:
        raise ManifestMismatchError(
            f"the model of stage {stage!r} does not continue the previous stage's "
            f"({len(problems)} difference(s): {listed(problems, 8, '; ')}). If the stage "
            "replaces these tensors on purpose, mark them as new with "
            "next_stage(..., renamed={name: None}); otherwise record this model into a new "
            "store. The store was not modified."
        )
    if old and not matches:
        raise ManifestMismatchError(
            f"no tensor of the model of stage {stage!r} continues one of the previous stage's "
            f"({len(old)} tensors, e.g. {next(iter(old))}): it is another model. Record it into "
            "a new store. The store was not modified."
        )
    return Continuation(
        {n: o for n, (o, _) in matches.items()}, {n: how for n, (_, how) in matches.items()}
    )


@dataclass(frozen=True)
class StageChange:
    """What a stage changed in the model, for people: ``inspect`` and the report.

    Attributes
    ----------
    renamed
        ``(previous name, name, how matched)`` of continued tensors whose name changed.
    added
        Names of tensors the previous stage did not have.
    dropped
        Names of the previous stage's tensors this stage does not have.
    matched_by
        How many continued tensors each rule matched, e.g. ``{"identity": 12}``.
    """

    renamed: list[tuple[str, str, str]]
    added: list[str]
    dropped: list[str]
    matched_by: dict[str, int]

    @property
    def changed(self) -> bool:
        """Whether any tensor was renamed, added or dropped."""
        return bool(self.renamed or self.added or self.dropped)

    def summary(self) -> str:
        """One line, e.g. ``12 tensors continue (12 by identity), 4 added, 0 dropped``."""
        continued = sum(self.matched_by.values())
        how = ", ".join(f"{n} by {rule}" for rule, n in sorted(self.matched_by.items()))
        return (
            f"{continued} tensors continue ({how or 'none'}), {len(self.added)} added, "
            f"{len(self.dropped)} dropped"
        )


def stage_change(previous: Manifest, current: Manifest, continuation: Continuation) -> StageChange:
    """Summarise ``continuation`` between two manifests."""
    continued = continuation.previous
    return StageChange(
        renamed=sorted((o, n, continuation.matched_by[n]) for n, o in continued.items() if n != o),
        added=[e["name"] for e in current if e["name"] not in continued],
        dropped=sorted({e["name"] for e in previous} - set(continued.values())),
        matched_by={
            rule: sum(1 for how in continuation.matched_by.values() if how == rule)
            for rule in set(continuation.matched_by.values())
        },
    )
