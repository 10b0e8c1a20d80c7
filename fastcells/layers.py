"""Drop-in replacements for ``keras.layers.LSTM``, ``GRU`` and ``SimpleRNN``.

Each subclasses the built-in layer (same arguments, same weights, same config) and overrides
``inner_loop``, the hook Keras gives backends for a fused recurrence, so everything around the
loop (masks, initial and stateful states, return_state, dropout draws, Bidirectional,
serialization) is Keras's own code. One argument is added: ``engine``.

Example::

    import keras
    from fastcells import LSTM
    model = keras.Sequential([
        keras.Input((500,), dtype="int32"),
        keras.layers.Embedding(10000, 32),
        LSTM(32),                                   # instead of keras.layers.LSTM(32)
        keras.layers.Dense(1, activation="sigmoid"),
    ])
"""
import logging
import warnings

import keras
from keras import ops as kops

from . import _export, _math, bridge, config, ops

ENGINES = ("auto", "cpu", "cuda", "keras")

_said_gpu = []


def _say_gpu_keeps_builtin():
    """One log line per process: why engine="auto" runs the built-in layer on a GPU."""
    if not _said_gpu:
        _said_gpu.append(True)
        logging.getLogger("fastcells").warning(
            "fastcells: the inputs are on a GPU, where engine='auto' runs the built-in "
            "implementation (cuDNN): the CUDA kernels have not been verified on a GPU yet. "
            "engine='cuda', or FASTCELLS_AUTO_CUDA=1 (config.AUTO_CUDA), runs them.")


def _check_engine(engine):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got engine={engine!r}")
    return engine


def _stack_masks(m, gates, implementation, batch_like):
    """Dropout masks as the kernels take them: [B, n] shared, or [G, B, n] per gate."""
    if m is None:
        return None
    if isinstance(m, (list, tuple)):
        return kops.stack(list(m), axis=0)
    if implementation == 1 and gates > 1:
        # Keras before 3.11 drew a single [B, n] mask here and gate k used its row k,
        # broadcast over the batch.
        shape = kops.shape(batch_like)
        return kops.stack([kops.broadcast_to(m[k], shape) for k in range(gates)], axis=0)
    return m


class _FastRNN:
    """Shared machinery; mixed in before the built-in layer class."""

    _cell_name = None       # the key of ops.CELLS

    def __init__(self, units, *args, engine="auto", checkpoint_steps=None, **kwargs):
        super().__init__(units, *args, **kwargs)
        self.engine = _check_engine(engine)
        if checkpoint_steps is not None and (isinstance(checkpoint_steps, bool) or
                                             not isinstance(checkpoint_steps, int) or
                                             checkpoint_steps < 1):
            raise ValueError(f"checkpoint_steps must be a positive int or None, got "
                             f"{checkpoint_steps!r}")
        self.checkpoint_steps = checkpoint_steps
        self._warned = set()
        #: which implementation the last call traced: "cpu", "cuda" or "keras" (for tests
        #: and logs)
        self.last_engine = None

    @property
    def _gates(self):
        return ops.CELLS[self._cell_name].gates

    # Keras's Layer.__init__ assigns supports_jit; the answer depends on the backend instead
    @property
    def supports_jit(self):
        """Whether Keras may compile a model holding this layer (``jit_compile``).

        On JAX the kernels run inside ``jax.jit`` (an XLA FFI target) and on torch inside
        ``torch.compile`` (a custom op), so the whole step compiles. TensorFlow's XLA cannot
        hold them (they are Python ops): a model compiled with an explicit
        ``jit_compile=True`` runs the built-in recurrence there, compiled by XLA, with one
        warning that says so; ``jit_compile="auto"`` resolves to no XLA, so the kernels run.
        """
        if keras.backend.backend() != "tensorflow":
            return True
        return _export.explicit_jit_request()

    @supports_jit.setter
    def supports_jit(self, value):
        pass

    def _warn_once(self, reason, message):
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(message, stacklevel=4)

    def get_config(self):
        config = super().get_config()
        config["engine"] = self.engine
        config["checkpoint_steps"] = self.checkpoint_steps
        return config

    # ------------------------------------------------------------------ validation
    def call(self, sequences, initial_state=None, mask=None, training=False):
        self._validate_call(sequences, initial_state, mask)
        return super().call(sequences, initial_state=initial_state, mask=mask,
                            training=training)

    def _validate_call(self, sequences, initial_state, mask):
        shape = tuple(sequences.shape)
        name = f"{type(self).__name__} layer '{self.name}'"
        if len(shape) != 3:
            raise ValueError(f"{name}: inputs must be 3-D (batch, time, features), got shape "
                             f"{shape}")
        if shape[1] == 0:
            raise ValueError(f"{name}: inputs have no time steps (shape {shape})")
        D = self.cell.kernel.shape[0] if getattr(self.cell, "built", False) else None
        if D is not None and shape[2] is not None and shape[2] != D:
            raise ValueError(f"{name}: inputs have {shape[2]} features but the layer was built "
                             f"for {D} (kernel shape {tuple(self.cell.kernel.shape)}); got "
                             f"inputs of shape {shape}")
        if initial_state is not None:
            states = initial_state if isinstance(initial_state, (list, tuple)) else [initial_state]
            n = len(self.state_size)
            if len(states) != n:
                raise ValueError(f"{name}: expects {n} initial state(s) of shape (batch, "
                                 f"{self.cell.units}), got {len(states)}: "
                                 f"{[tuple(getattr(s, 'shape', ())) for s in states]}")
            for k, s in enumerate(states):
                ss = tuple(getattr(s, "shape", ()))
                ok = len(ss) == 2 and ss[1] in (None, self.cell.units) and (
                    ss[0] is None or shape[0] is None or ss[0] == shape[0])
                if not ok:
                    raise ValueError(f"{name}: initial_state[{k}] must have shape (batch, units)"
                                     f" = {(shape[0], self.cell.units)}, got {ss}")
        if mask is not None:
            m = mask[0] if isinstance(mask, (list, tuple)) else mask
            ms = tuple(getattr(m, "shape", ()))
            ok = len(ms) == 2 and all(a is None or b is None or a == b
                                      for a, b in zip(ms, shape[:2]))
            if not ok:
                raise ValueError(f"{name}: mask must have shape (batch, time) = {shape[:2]}, "
                                 f"got {ms}")

    # ------------------------------------------------------------------ dispatch
    def _unsupported(self, backend_bridge):
        """None when the fastcells kernels cover this layer, else the reason."""
        if backend_bridge is None:
            return f"the '{keras.backend.backend()}' Keras backend has no fastcells bridge yet"
        cell = self.cell
        if _math.activation_code(cell.activation) is None:
            return f"activation={getattr(cell.activation, '__name__', cell.activation)!r}"
        ract = getattr(cell, "recurrent_activation", None)
        if self._gates > 1 and _math.activation_code(ract) is None:
            return f"recurrent_activation={getattr(ract, '__name__', ract)!r}"
        return None

    def _fallback(self, reason, sequences, initial_state, mask, training):
        if self.engine in ("cpu", "cuda"):
            raise ValueError(f"{type(self).__name__}(engine={self.engine!r}) cannot run this "
                             f"configuration: {reason}. Use engine='auto' to fall back to the "
                             f"built-in implementation")
        self._warn_once(reason, f"fastcells.{type(self).__name__} '{self.name}': using the "
                        f"built-in Keras implementation because {reason}")
        return self._keras_inner_loop(sequences, initial_state, mask, training)

    def _keras_inner_loop(self, sequences, initial_state, mask, training):
        self.last_engine = "keras"
        return super().inner_loop(sequences, initial_state, mask=mask, training=training)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if self.engine == "keras":
            return self._keras_inner_loop(sequences, initial_state, mask, training)
        if _export.exporting():
            # an exported artifact must run where fastcells is not installed: it holds the
            # built-in recurrence, on the same weights
            self.last_engine = "keras"
            return super().inner_loop(sequences, initial_state, mask=mask, training=training)
        if _export.in_tf_xla():
            return self._fallback(_export.XLA_REASON, sequences, initial_state, mask, training)
        mod = bridge.get(keras.backend.backend())
        reason = self._unsupported(mod)
        if reason is not None:
            return self._fallback(reason, sequences, initial_state, mask, training)
        call = self._kernel_call(sequences, initial_state, mask, training)
        reason = mod.supports(call)
        engine = bridge.engine_for(mod, call) if reason is None else None
        if reason is None and self.engine in ("cpu", "cuda") and engine != self.engine:
            where = "a GPU" if engine == "cuda" else "the CPU"
            reason = f"the inputs live on {where}, so engine={self.engine!r} cannot run them"
        if reason is not None:
            return self._fallback(reason, sequences, initial_state, mask, training)
        if engine == "cuda" and self.engine == "auto" and not config.AUTO_CUDA:
            _say_gpu_keeps_builtin()
            return self._keras_inner_loop(sequences, initial_state, mask, training)
        self.last_engine = engine
        in_dtype = call.x.dtype
        outputs, states = mod.run(call)
        outputs = kops.cast(outputs, in_dtype)
        states = [kops.cast(s, in_dtype) for s in states]
        if self.return_sequences:
            return outputs[:, -1], outputs, states
        return outputs, kops.expand_dims(outputs, 1), states

    def _kernel_call(self, sequences, initial_state, mask, training):
        cell = self.cell
        states = (list(initial_state) if isinstance(initial_state, (list, tuple))
                  else [initial_state])
        dmask = rmask = None
        training = bool(training)
        if training:
            # as the built-in cells: LSTM/GRU apply 0 < rate < 1, SimpleRNN any rate > 0
            rnn = self._cell_name == "simple_rnn"

            def applies(rate):
                return rate > 0.0 if rnn else 0.0 < rate < 1.0

            impl = getattr(cell, "implementation", 2)
            if applies(cell.dropout):
                dmask = _stack_masks(cell.get_dropout_mask(sequences[:, 0, :]), self._gates,
                                     impl, sequences[:, 0, :])
            if applies(cell.recurrent_dropout):
                rmask = _stack_masks(cell.get_recurrent_dropout_mask(states[0]), self._gates,
                                     impl, states[0])
        # the kernels compute in float32 or float64; mixed precision runs them in float32
        dtype = keras.backend.standardize_dtype(sequences.dtype)
        kdtype = dtype if dtype in ("float32", "float64") else "float32"

        def cast(t):
            return None if t is None else kops.cast(t, kdtype)

        options = dict(go_backwards=bool(self.go_backwards),
                       zero_output_for_mask=bool(self.zero_output_for_mask),
                       activation=_math.activation_code(cell.activation),
                       checkpoint_steps=self.checkpoint_steps)
        if self._gates > 1:
            options["recurrent_activation"] = _math.activation_code(cell.recurrent_activation)
        if self._cell_name == "gru":
            options["reset_after"] = bool(cell.reset_after)
        bias = cell.bias if cell.use_bias else None
        return bridge.KernelCall(
            cell=self._cell_name, x=cast(sequences), kernel=cast(cell.kernel),
            recurrent_kernel=cast(cell.recurrent_kernel), bias=cast(bias),
            states=[cast(s) for s in states],
            mask=None if mask is None else kops.cast(mask, "bool"),
            dropout_mask=cast(dmask), recurrent_dropout_mask=cast(rmask), training=training,
            options=options, return_sequences=bool(self.return_sequences),
            engine=self.engine)


@keras.saving.register_keras_serializable(package="fastcells")
class LSTM(_FastRNN, keras.layers.LSTM):
    """``keras.layers.LSTM`` running the fastcells kernels.

    Takes every argument of ``keras.layers.LSTM`` plus:
        engine: "auto" (default: the CPU kernels for inputs on the host, the built-in
            implementation with one warning for configurations the kernels do not cover;
            for inputs on a GPU the built-in implementation, or the CUDA kernels with
            ``config.AUTO_CUDA``), "cpu", "cuda" (raise for such configurations) or
            "keras" (always the built-in implementation).
        checkpoint_steps: None (default: the forward keeps its whole cache for the
            backward) or K, to keep only the states entering every K-th step and recompute
            each chunk in the backward: the training memory of a sequence of T steps goes
            from about (G + 3) T to (G + 3) K + 3 T / K vectors of B x H per layer (G gates),
            for about one more forward pass. Same gradients (to rounding).

    Example::

        layer = fastcells.LSTM(32, return_sequences=True, dropout=0.2, recurrent_dropout=0.2)
        y = layer(keras.random.normal((128, 500, 32)))
    """

    _cell_name = "lstm"


@keras.saving.register_keras_serializable(package="fastcells")
class GRU(_FastRNN, keras.layers.GRU):
    """``keras.layers.GRU`` running the fastcells kernels (both ``reset_after`` variants).

    Takes every argument of ``keras.layers.GRU`` plus ``engine`` (see :class:`LSTM`).

    Example::

        layer = fastcells.GRU(64, reset_after=False, go_backwards=True)
    """

    _cell_name = "gru"


@keras.saving.register_keras_serializable(package="fastcells")
class SimpleRNN(_FastRNN, keras.layers.SimpleRNN):
    """``keras.layers.SimpleRNN`` running the fastcells kernels.

    Takes every argument of ``keras.layers.SimpleRNN`` plus ``engine`` (see :class:`LSTM`).

    Example::

        layer = fastcells.SimpleRNN(16, activation="relu", return_state=True)
    """

    _cell_name = "simple_rnn"
