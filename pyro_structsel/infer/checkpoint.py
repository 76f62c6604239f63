"""Checkpoint files of a fit: written atomically, read back as data, matched to the run.

A checkpoint holds the parameters, the optimiser state, the RNG state, the
step and the loss trace, written to a temporary file and renamed over the
old one, so a run killed at any moment leaves either the previous or the
new checkpoint, never half of one.

**A checkpoint is data.** It holds tensors and plain Python values (dicts,
lists, numbers, strings) only: the parameters' constraints are stored by
name and NumPy's RNG state as a tensor, and :func:`load_checkpoint` reads the
file with ``torch.load(..., weights_only=True)``, whose unpickler builds
nothing else. A file that asks for any other object (a planted pickle
whose unpickling would run a command) is refused before anything in it is
built, so a checkpoint from a shared folder is safe to load.

**A checkpoint belongs to one run.** It carries a fingerprint of the run
that wrote it (:func:`run_fingerprint`): the model's sample sites with their
shapes and option labels, the guide's parameters, the data (shapes, dtypes
and a hash of the values) and the optimiser with its settings. A run
resumes only from a checkpoint whose fingerprint matches its own
(:func:`check_resume`); otherwise it stops and says what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample

from ..model.sites import OPTIONS_KEY
from ..util.sampling import trace_model
from ..util.minibatch import full_data
from ..util.options import Resume
from ..util.ranks import use_distributed
from ..util.stacklevel import find_stack_level
from ..util.validation import argument_names
from .optim import optimizer_settings

CHECKPOINT_FORMAT = "pyro_structsel.checkpoint/2"

#: Constraints built by a factory, and the attributes that rebuild them.
_CONSTRAINT_FACTORIES: dict[str, tuple[str, ...]] = {
    "independent": ("base_constraint", "reinterpreted_batch_ndims"),
    "interval": ("lower_bound", "upper_bound"),
    "half_open_interval": ("lower_bound", "upper_bound"),
    "integer_interval": ("lower_bound", "upper_bound"),
    "greater_than": ("lower_bound",),
    "greater_than_eq": ("lower_bound",),
    "less_than": ("upper_bound",),
}
_CONSTRAINT_KEY = "__constraint__"
_NDARRAY_KEY = "__ndarray__"


class CheckpointWarning(UserWarning):
    """A checkpoint was resumed although the run differs from the one that wrote it."""


# ----------------------------------------------------------------------------- data only


def _constraint_spec(constraint: Any, where: str) -> dict[str, Any]:
    for name in dir(constraints):
        if not name.startswith("_") and getattr(constraints, name) is constraint:
            return {_CONSTRAINT_KEY: name}
    for name, fields in _CONSTRAINT_FACTORIES.items():
        if type(constraint) is getattr(constraints, name):
            return {_CONSTRAINT_KEY: name,
                    "args": {f: _encode(getattr(constraint, f), where) for f in fields}}
    raise ValueError(f"Cannot store the constraint {constraint!r} of {where} in a checkpoint: "
                     "only the constraints of pyro.distributions.constraints (by name) and "
                     f"{', '.join(sorted(_CONSTRAINT_FACTORIES))} are stored as data.")


def _encode(value: Any, where: str) -> Any:
    """``value`` with constraints and NumPy arrays replaced by plain data (see module notes)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size)):
        return value
    if isinstance(value, constraints.Constraint):
        return _constraint_spec(value, where)
    if isinstance(value, np.ndarray):
        return {_NDARRAY_KEY: torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "iu"
                                                else value.copy()),
                "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: _encode(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ValueError(f"Cannot store {type(value).__name__} at {where} in a checkpoint: a "
                     "checkpoint holds tensors and plain Python data only.")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if _CONSTRAINT_KEY in value:
            factory = getattr(constraints, value[_CONSTRAINT_KEY])
            if "args" not in value:
                return factory
            return factory(**{key: _decode(item) for key, item in value["args"].items()})
        if _NDARRAY_KEY in value:
            return value[_NDARRAY_KEY].numpy().astype(value["dtype"])
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode(item) for item in value)
    return value


def check_checkpoint_path(path: Any, argument: str = "checkpoint") -> None:
    """Refuse a checkpoint path that could never be written, before a fit starts."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected {argument} to be a file path (str or pathlib.Path), but got "
                        f"{path!r}.")
    name = os.fspath(path)
    if not name or os.path.isdir(name):
        raise ValueError(f"Expected {argument} to be a file path, but {name!r} is a folder; "
                         f"pass a file in it, such as {os.path.join(name, 'fit.pt')!r}.")
    for parent in Path(name).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"Cannot write the checkpoint {name!r}: {str(parent)!r} is a "
                                 f"file, not a folder; pass another {argument} path.")
            break


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename).

    The state is stored as data (see the module notes); a value that is not
    raises ``ValueError`` and leaves the old checkpoint as it was.
    """
    path = Path(path)
    encoded = _encode(dict(state), "the checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(encoded, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` if there is none. Never runs code from the file.

    Raises
    ------
    ValueError
        If ``path`` is a folder, or the file is not a pyro_structsel
        checkpoint of this format, or it holds anything but tensors and plain
        data (such a file is refused before any object in it is built).
    """
    name = os.fspath(path)
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise ValueError(f"The checkpoint path {name!r} is a folder; pass a file path such as "
                         f"{os.path.join(name, 'fit.pt')!r}.")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        refused = found.group(1) if found else None
        raise ValueError(
            f"Refusing to load {name!r}: it is not a pyro_structsel checkpoint of this format"
            + (f" (it asks to build {refused}, which a checkpoint never holds)" if refused
               else "")
            + ". A checkpoint holds tensors and plain data only and loading it runs no code; "
            "remove the file or pass another checkpoint path.") from None
    except Exception:  # noqa: BLE001 -- not a torch file at all (text, empty, truncated)
        state = None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise ValueError(
            f"{name!r} is not a pyro_structsel checkpoint"
            + (f" of this version ({found!r}, expected {CHECKPOINT_FORMAT!r})" if found else "")
            + "; remove it or pass another checkpoint path.")
    return _decode(state)


# ----------------------------------------------------------------------------- fingerprint


def data_hash(tensor: torch.Tensor) -> str:
    """A cheap hash of a tensor's values: all of them up to 64 MB, an even sample beyond."""
    flat = tensor.detach().cpu().reshape(-1)
    if flat.numel() * flat.element_size() > 64 * 2 ** 20:
        step = flat.numel() // (2 ** 22) + 1
        flat = torch.cat([flat[::step], flat.double().sum().reshape(1).to(flat.dtype)])
    data = flat.contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _describe_input(value: Any) -> Any:
    if torch.is_tensor(value):
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                "hash": data_hash(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    return {"type": type(value).__name__}


def run_fingerprint(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any],
                    optim: Any) -> dict[str, Any]:
    """What identifies a fit: the model's sites, its inputs and its optimiser (plain data).

    ``sites``: every sample site (name → shape, observed or not, option labels
    of structural sites), traced on the full data in one process (so the
    fingerprint does not depend on the rank or the minibatch); ``params``: the parameter store's names and shapes
    (the guide's and the model's, once the guide has been built);
    ``inputs``: every model argument (tensor: shape, dtype and
    :func:`data_hash`; number or string: its value); ``optimizer``:
    :func:`~pyro_structsel.infer.optim.optimizer_settings`.
    """
    rng = pyro.util.get_rng_state()  # the fingerprint must not move the random streams
    try:  # every rank and every minibatch size sees the same, full data
        with use_distributed(False), full_data():
            trace = trace_model(model, args, kwargs)
    finally:
        pyro.util.set_rng_state(rng)
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        options = site["infer"].get(OPTIONS_KEY)
        sites[name] = {"shape": list(site["value"].shape), "observed": bool(site["is_observed"]),
                       "options": list(options) if options is not None else None}
    params = {name: list(value.shape) for name, value in pyro.get_param_store().items()}
    inputs = {name: _describe_input(value)
              for name, value in zip(argument_names(model, len(args)), args)}
    inputs.update({name: _describe_input(value) for name, value in kwargs.items()})
    return json.loads(json.dumps({"sites": sites, "params": params, "inputs": inputs,
                                  "optimizer": optimizer_settings(optim)}, default=str))


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]
                            ) -> dict[str, list[str]]:
    """What differs between two fingerprints, by part (``model``, ``data``, ``optimizer``)."""
    out: dict[str, list[str]] = {"model": [], "data": [], "optimizer": []}
    for part, kind in (("sites", "site"), ("params", "parameter")):
        old, new = saved.get(part, {}), current.get(part, {})
        for name in sorted(set(old) | set(new)):
            if name not in new:
                out["model"].append(f"{kind} {name!r} is in the checkpoint but not in this run")
            elif name not in old:
                out["model"].append(f"{kind} {name!r} is in this run but not in the checkpoint")
            elif old[name] != new[name]:
                if kind == "site" and old[name].get("observed") and new[name].get("observed"):
                    if old[name]["shape"] != new[name]["shape"]:
                        out["data"].append(f"observed site {name!r} has shape "
                                           f"{old[name]['shape']} there and {new[name]['shape']}"
                                           " here")
                    continue
                what = [key for key in ("shape", "options", "observed")
                        if isinstance(old[name], dict) and old[name].get(key) != new[name].get(key)]
                for key in what or ["shape"]:
                    before = old[name][key] if isinstance(old[name], dict) else old[name]
                    after = new[name][key] if isinstance(new[name], dict) else new[name]
                    out["model"].append(f"{kind} {name!r} has {key} {_short(before)} in the "
                                        f"checkpoint and {_short(after)} in this run")
    old_in, new_in = saved.get("inputs", {}), current.get("inputs", {})
    for name in sorted(set(old_in) | set(new_in)):
        before, after = old_in.get(name), new_in.get(name)
        if before == after:
            continue
        if before is None or after is None:
            out["data"].append(f"model argument {name!r} is passed "
                               f"{'here' if before is None else 'there'} only")
        elif "shape" in before and "shape" in after:
            changed = [key for key in ("shape", "dtype") if before[key] != after[key]]
            out["data"].append(
                "; ".join(f"model argument {name!r} has {key} {before[key]} in the checkpoint "
                          f"and {after[key]} in this run" for key in changed)
                or f"model argument {name!r} has the same shape {before['shape']} but "
                   "different values")
        else:
            out["data"].append(f"model argument {name!r} is {_short(before)} in the checkpoint "
                               f"and {_short(after)} in this run")
    old_opt, new_opt = saved.get("optimizer", {}), current.get("optimizer", {})
    if old_opt.get("class") != new_opt.get("class"):
        out["optimizer"].append(f"the optimiser is {old_opt.get('class')} in the checkpoint and "
                                f"{new_opt.get('class')} in this run")
    elif old_opt.get("args") != new_opt.get("args"):
        old_args, new_args = old_opt.get("args"), new_opt.get("args")
        if isinstance(old_args, dict) and isinstance(new_args, dict):
            for key in sorted(set(old_args) | set(new_args)):
                if old_args.get(key) != new_args.get(key):
                    out["optimizer"].append(f"the optimiser's {key} is {old_args.get(key)!r} in "
                                            f"the checkpoint and {new_args.get(key)!r} in this run")
        else:
            out["optimizer"].append(f"the optimiser's settings are {_short(old_args)} in the "
                                    f"checkpoint and {_short(new_args)} in this run")
    return {part: lines for part, lines in out.items() if lines}


def check_resume(path: str, state: Mapping[str, Any], fingerprint: Mapping[str, Any],
                 resume: Resume) -> dict[str, list[str]]:
    """Refuse (or, relaxed, warn about) a checkpoint written by a run unlike this one.

    Returns the differences (empty when the runs match). Raises
    ``ValueError`` listing them unless ``resume`` is relaxed and only the
    data values and the optimiser settings differ.
    """
    saved = json.loads(state["fingerprint"]) if isinstance(state.get("fingerprint"), str) else {}
    differences = fingerprint_differences(saved, fingerprint)
    if not differences:
        return {}
    every = [line for part in differences.values() for line in part]
    lines = "\n".join(f"  - {line}" for line in every[:8]) + (
        f"\n  - and {len(every) - 8} more" if len(every) > 8 else "")
    structural = "model" in differences or any(
        "shape" in line or "passed" in line for line in differences.get("data", []))
    if resume is Resume.STRICT or structural:
        advice = ("Remove the file or pass another checkpoint path to start afresh"
                  + ("." if structural else
                     ", or pass resume='relaxed' to continue that fit with this run's data and "
                     "optimiser settings."))
        raise ValueError(f"The checkpoint {path!r} was written by a different run, so resuming "
                         f"from it would continue another fit:\n{lines}\n{advice}")
    warnings.warn(f"Resuming the checkpoint {path!r} (resume='relaxed') although this run "
                  f"differs from the one that wrote it:\n{lines}", CheckpointWarning,
                  stacklevel=find_stack_level())
    return differences


def with_optimizer_settings(optim_state: Mapping[str, Any], optim: Any) -> dict[str, Any]:
    """A saved Pyro optimiser state whose hyperparameters are those of ``optim``.

    Pyro's optimisers restore the saved hyperparameters with the state; a
    relaxed resume applies the new ones instead, on every path.
    """
    args = getattr(optim, "pt_optim_args", None)
    if not isinstance(args, Mapping):
        return dict(optim_state)
    out = {}
    for name, per_param in optim_state.items():
        groups = [{**group, **{k: v for k, v in args.items() if k in group}}
                  for group in per_param.get("param_groups", [])]
        out[name] = {**per_param, "param_groups": groups}
    return out
