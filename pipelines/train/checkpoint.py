"""Checkpoints that hold everything needed for an exact resume, in safetensors + JSON only.

A checkpoint folder `checkpoint-<step>/` holds:
- `weights.safetensors`: the trainable tensors (LoRA or full UNet/text encoder), by parameter name;
- `optimizer.safetensors` + `optimizer.json`: the optimizer's tensors and its scalars/param groups;
- `ema.safetensors` + `ema.json` when EMA is on;
- `state.json`: step, the lr scheduler's and grad scaler's state, python and numpy RNG states;
- `rng.safetensors`: torch CPU and CUDA RNG states.
Nothing is pickled, so loading a checkpoint never runs code from the file. accelerate's own
`save_state` pickles the optimizer and RNG states, which is why it is not used here.
The data order needs no file: it is a pure function of (seed, epoch), and the step says where to
continue in it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"
_HOW_ADAM_RUNS = ("fused", "foreach", "capturable")  # param-group keys that choose a kernel, not the update


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors + JSON: every tensor, however deeply nested (bitsandbytes keeps its
    quantisation state in a dict per parameter), is replaced in the JSON tree by {"__tensor__": key}."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}  # a tensor shared by several slots (bitsandbytes' qmaps) is stored once

    def strip(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen[id(value)] = path
                tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": seen[id(value)]}
        if isinstance(value, dict):
            return {str(k): strip(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strip(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value

    tree = {str(index): strip(slots, str(index)) for index, slots in state["state"].items()}
    return tensors, {"format": 2, "param_groups": state["param_groups"], "state": tree}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    if meta.get("format") != 2:  # checkpoints written before nested state was supported
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        for index, slots in meta["scalars"].items():
            state.setdefault(int(index), {}).update(slots)
        return {"state": state, "param_groups": meta["param_groups"]}

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    return {"state": {int(index): fill(slots) for index, slots in meta["state"].items()}, "param_groups": meta["param_groups"]}


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _numpy_rng_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any = None,
    ema: Any = None,
    extra: dict | None = None,
    also_write: Callable[[Path], Any] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically (to a temp folder, then renamed); `also_write(folder)` adds files to it."""
    target = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(tmp, trainable=trainable, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, ema=ema,
                          step=step, extra=extra, also_write=also_write)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # half written (a full disk): it would hold the space that is short
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _write_checkpoint(tmp: Path, *, trainable, optimizer, lr_scheduler, scaler, ema, step: int, extra, also_write) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "weights.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    if ema is not None:
        ema_state = ema.state_dict()
        shadow = ema_state.pop("shadow_params")
        save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(tmp / "ema.safetensors"))
        (tmp / "ema.json").write_text(json.dumps(ema_state))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = cuda_state
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {
        "step": step,
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "python_rng": _python_rng_to_json(random.getstate()),
        "numpy_rng": _numpy_rng_to_json(np.random.get_state()),
        **(extra or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state, default=str))
    if also_write is not None:
        also_write(tmp)


REQUIRED_FILES = ("weights.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")


def damaged_files(path: Path) -> list[str]:
    """The files of a checkpoint that are missing or cannot be read. It is written whole or not at all (a temp folder,
    then renamed), so this is a file cut off by a disk fault or a crash before the data reached the disk, or an edit."""
    from safetensors import safe_open

    names = list(REQUIRED_FILES) + [n for n in ("ema.safetensors", "ema.json") if (path / n).exists()]
    damaged = []
    for name in names:
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(path / name), framework="pt"):  # refuses a file its header does not cover whole
                    pass
            else:
                json.loads((path / name).read_text())
        except Exception:  # any failure to read it is the answer, whatever the library raises
            damaged.append(name)
    return damaged


def load_weights(path: Path, model_parameters: dict[str, torch.nn.Parameter]) -> None:
    """Copy a checkpoint's trained weights into the parameters of the same names (all of them, and no others)."""
    weights = load_file(str(path / "weights.safetensors"))
    missing = set(model_parameters) - set(weights)
    unexpected = set(weights) - set(model_parameters)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path} does not match this run's trainable weights "
            f"({len(missing)} missing, {len(unexpected)} unexpected): was it written with other settings?"
        )
    with torch.no_grad():
        for name, param in model_parameters.items():
            param.copy_(weights[name].to(param.device, param.dtype))


def load_checkpoint(
    path: Path,
    *,
    model_parameters: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any = None,
    ema: Any = None,
) -> dict:
    """Restore a checkpoint into live objects; returns its state.json (step, extras)."""
    load_weights(path, model_parameters)
    optimizer_state = _unflatten_optimizer(
        load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
    )
    # torch takes whole param groups from the state dict: how the update runs (fused kernel or loop) must stay
    # as this run asks, since a resume may switch it (the same update, up to the last bits)
    how = [{k: group[k] for k in _HOW_ADAM_RUNS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    for group, kept in zip(optimizer.param_groups, how):
        group.update(kept)
        if kept:  # torch placed `step` for the saved kernel: the fused one keeps it beside the weights, the loop on the CPU
            beside = bool(group.get("fused") or group.get("capturable"))
            for param in group["params"]:
                slots = optimizer.state.get(param, {})
                if isinstance(slots.get("step"), torch.Tensor):
                    slots["step"] = slots["step"].to(dtype=torch.float32, device=param.device if beside else "cpu")
    state = json.loads((path / "state.json").read_text())
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema_state = json.loads((path / "ema.json").read_text())
        shadow = load_file(str(path / "ema.safetensors"))
        ema_state["shadow_params"] = [shadow[str(i)] for i in range(len(shadow))]
        ema.load_state_dict(ema_state)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


class DamagedCheckpoint(ValueError):
    """A checkpoint file is cut off or unreadable; the message says which and what to do."""


def damaged_checkpoint_message(checkpoint: Path, damaged: list[str]) -> str:
    """What to do when a checkpoint's files are missing or cut off: resume from the one before, or delete it."""
    earlier = [c for c in list_checkpoints(checkpoint.parent) if checkpoint_step(c) < checkpoint_step(checkpoint)]
    instead = (f"Resume from the one before it (--resume {earlier[-1].name}), or delete {checkpoint} and resume with --resume latest."
               if earlier else f"No earlier checkpoint is left: delete {checkpoint} to start the run again from step 0.")
    return f"{checkpoint.name} cannot be read: {', '.join(damaged)} missing or cut off (a disk fault, or a crash before it reached the disk). {instead}"


def saved_config(path: Path) -> dict | None:
    """The training options a checkpoint was written with (None for checkpoints from before they were saved);
    DamagedCheckpoint when its state.json is cut off (an empty file after a power cut, say)."""
    state_file = path / "state.json"
    if not state_file.is_file():
        return None
    try:
        return json.loads(state_file.read_text()).get("config")
    except (OSError, ValueError, AttributeError) as error:
        raise DamagedCheckpoint(damaged_checkpoint_message(path, ["state.json"])) from error


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder (checkpoint-N) was saved at."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints in step order (temp folders of an interrupted save are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(folder: Path, resume: str) -> Path | None:
    """The checkpoint `--resume` names: 'latest' (None when there is none yet) or a path."""
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = folder / resume
    if not (path / "weights.safetensors").is_file():
        raise FileNotFoundError(f"{resume} is not a checkpoint folder (no weights.safetensors).")
    return path


def prune_checkpoints(folder: Path, keep: int | None) -> None:
    """Keep only the newest `keep` checkpoints (all when keep is None)."""
    if keep is None:
        return
    if keep < 1:  # [:-0] would delete every one, the one a resume needs included
        raise ValueError("checkpoints_total_limit must be at least 1 (None keeps every checkpoint)")
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
