"""Cache prefetch hints for the numba kernels (scoring and reconstruction): ``prefetch_for_read(array,
index)`` and ``prefetch_for_write(array, index)`` ask the CPU to fetch the cache line of
``array.flat[index]`` ahead of its use (LLVM's ``llvm.prefetch``). Kernels that gather from or scatter
into grids far larger than the caches wait on a miss at nearly every sample without them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency
    numba = None  # type: ignore[assignment]  # None marks numba as missing

AVAILABLE = numba is not None

if AVAILABLE:
    from llvmlite import binding as _llvm_binding
    from llvmlite import ir as _llvm_ir
    from numba import types as _numba_types
    from numba.core import cgutils as _cgutils
    from numba.core.base import BaseContext as _TargetContext
    from numba.core.typing.context import BaseContext as _TypingContext
    from numba.core.typing.templates import Signature as _Signature
    from numba.extending import intrinsic as _intrinsic

    # LLVM 17+ has only opaque pointers (intrinsic suffix p0); older ones typed pointers.
    _PREFETCH_NAME = "llvm.prefetch.p0" if _llvm_binding.llvm_version_info[0] >= 17 else "llvm.prefetch.p0i8"

    # The intrinsics' typing functions get numba types, their code generators llvmlite's IR
    # builder and values; both run in Python while a kernel is compiled.
    _Codegen = Callable[[_TargetContext, _llvm_ir.IRBuilder, _Signature, Sequence[_llvm_ir.Value]], _llvm_ir.Value]

    def _prefetch_intrinsic(write: int) -> Callable[..., None]:
        def prefetch(typingctx: _TypingContext, array: _numba_types.Type,
                     index: _numba_types.Type) -> tuple[_Signature, _Codegen]:  # pragma: no cover - compiled
            signature = _numba_types.void(array, _numba_types.intp)

            def codegen(context: _TargetContext, builder: _llvm_ir.IRBuilder, sig: _Signature,
                    args: Sequence[_llvm_ir.Value]) -> _llvm_ir.Value:
                data = context.make_array(sig.args[0])(context, builder, args[0]).data
                pointer = builder.bitcast(builder.gep(data, [args[1]]), _llvm_ir.IntType(8).as_pointer())
                int32 = _llvm_ir.IntType(32)
                function = _cgutils.get_or_insert_function(
                    builder.module,
                    _llvm_ir.FunctionType(_llvm_ir.VoidType(), [pointer.type, int32, int32, int32]),
                    _PREFETCH_NAME)
                builder.call(function, [pointer, int32(write), int32(3), int32(1)])
                return context.get_dummy_value()

            return signature, codegen

        return _intrinsic(prefetch)

    #: Hint the CPU to fetch ``array.flat[index]``'s cache line for reading / for writing.
    prefetch_for_read = _prefetch_intrinsic(0)
    prefetch_for_write = _prefetch_intrinsic(1)
