"""Conversion between models with the built-in recurrent layers and models with fastcells
layers, in both directions, for models in memory and for ``.keras`` files.

The fastcells layers subclass the built-in ones and hold the same weights under the same
names, so a conversion only rewrites the model's configuration: each ``LSTM``, ``GRU`` and
``SimpleRNN`` entry (at any depth: nested models, ``Bidirectional``, ``TimeDistributed``)
changes class, and the two arguments fastcells adds (``engine``, ``checkpoint_steps``) are
added or removed. Weights, the compile configuration and the optimizer's state go across
unchanged. A model converted to the built-in layers loads where fastcells is not installed.

Layers that build a recurrent layer inside their own code (a subclassed layer or model
whose ``get_config`` does not list it), and ``keras.layers.RNN`` over a cell, are left as
they are.

Example::

    import fastcells, keras
    fast = fastcells.from_keras(model)          # built-in LSTM/GRU/SimpleRNN -> fastcells
    plain = fastcells.to_keras(fast)            # and back; loads without fastcells
    fastcells.convert_file("in.keras", "out.keras", to="keras")

The command line does the same for files::

    python -m fastcells convert in.keras out.keras --to keras
"""
import copy
import json
import os
import tempfile
import zipfile

CELLS = ("LSTM", "GRU", "SimpleRNN")
#: The arguments the fastcells layers add to the built-in ones, and their defaults.
FASTCELLS_ARGUMENTS = {"engine": "auto", "checkpoint_steps": None}
TARGETS = ("fastcells", "keras")
_CONFIG = "config.json"


def _is_builtin(entry):
    return (entry.get("class_name") in CELLS and entry.get("registered_name") is None
            and str(entry.get("module", "")).startswith("keras"))


def _is_fastcells(entry):
    return (entry.get("class_name") in CELLS
            and (str(entry.get("module", "")).startswith("fastcells")
                 or str(entry.get("registered_name", "")).startswith("fastcells>")))


def _rewrite_entry(entry, to):
    cls = entry["class_name"]
    if to == "fastcells" and _is_builtin(entry):
        entry["module"] = "fastcells.layers"
        entry["registered_name"] = f"fastcells>{cls}"
        for k, v in FASTCELLS_ARGUMENTS.items():
            entry.setdefault("config", {}).setdefault(k, v)
        return 1
    if to == "keras" and _is_fastcells(entry):
        entry["module"] = "keras.layers"
        entry["registered_name"] = None
        for k in FASTCELLS_ARGUMENTS:
            entry.get("config", {}).pop(k, None)
        return 1
    return 0


def rewrite_config(config, to):
    """A copy of a serialized model configuration with every recurrent layer entry turned
    into the ``to`` ("fastcells" or "keras") kind, and the number of entries changed."""
    _check_target(to)
    config = copy.deepcopy(config)
    changed = 0
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "class_name" in node:
                changed += _rewrite_entry(node, to)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return config, changed


def _check_target(to):
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got to={to!r}")


def convert_file(src, dst, to):
    """Write ``dst``, the ``.keras`` archive ``src`` with its recurrent layers turned into
    the ``to`` kind ("fastcells" or "keras"); returns the number of layers converted. The
    archive's other members (weights, assets, metadata) are copied byte for byte.

    Example::

        convert_file("model.keras", "model_plain.keras", to="keras")
    """
    _check_target(to)
    src, dst = os.fspath(src), os.fspath(dst)
    if not str(dst).endswith(".keras"):
        raise ValueError(f"dst must be a path ending in .keras, got dst={dst!r}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"dst must differ from src, got {dst!r} for both")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"src={src!r} does not exist")
    if not zipfile.is_zipfile(src):
        raise ValueError(f"src={src!r} is not a .keras archive (not a zip file)")
    with zipfile.ZipFile(src) as zin:
        if _CONFIG not in zin.namelist():
            raise ValueError(f"src={src!r} is not a .keras archive (it has no {_CONFIG}; "
                             f"members: {zin.namelist()[:5]})")
        try:
            config = json.loads(zin.read(_CONFIG))
        except ValueError as e:
            raise ValueError(f"src={src!r}: its {_CONFIG} is not valid JSON ({e})") from None
        config, changed = rewrite_config(config, to)
        tmp = dst + ".tmp"
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
                for info in zin.infolist():
                    if info.filename == _CONFIG:
                        zout.writestr(info, json.dumps(config))
                    else:
                        zout.writestr(info, zin.read(info.filename))
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return changed


def _convert_model(model, to):
    import keras
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model (Sequential, functional or a "
                        f"registered subclass), got {type(model).__name__}")
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.keras"), os.path.join(d, "out.keras")
        model.save(src)
        convert_file(src, dst, to)
        # the archive was written from the caller's own model a moment ago
        return keras.saving.load_model(dst, safe_mode=False)


def from_keras(model):
    """A copy of ``model`` with every built-in ``LSTM``, ``GRU`` and ``SimpleRNN`` replaced
    by the fastcells layer (``engine="auto"``): same arguments, weights, compile
    configuration and optimizer state; ``model`` is left as it was.

    Example::

        fast = fastcells.from_keras(keras.saving.load_model("imdb.keras"))
    """
    return _convert_model(model, "fastcells")


def to_keras(model):
    """A copy of ``model`` with every fastcells layer replaced by the built-in Keras layer
    (the ``engine`` and ``checkpoint_steps`` arguments dropped); it saves to a ``.keras``
    file that loads where fastcells is not installed. ``model`` is left as it was.

    Example::

        fastcells.to_keras(fast).save("imdb_plain.keras")
    """
    return _convert_model(model, "keras")
