"""The Julia adapter: Julia functions, differentiated by Zygote, as PyTorch ops (through juliacall).

    f = bridges.julia2pytorch("f", setup)  # setup: Julia code defining f, run once, own module
    y = f(x)                                # or f(x, y), ...: Julia's multiple dispatch decides

Conventions:
- Inputs: a tensor reaches Julia as a numpy view, which juliacall wraps as a `PyArray` without
  copying, whatever the strides (a transposed or sliced tensor is not copied either). Julia sees the
  tensor's shape and indices: `x[i, j]` in Julia is `x[i-1, j-1]` in Python. A `PyArray` is an
  `AbstractArray` but not an `Array`: write methods for `AbstractArray`, or call `Array(x)` in Julia
  for a dense column-major copy (BLAS speed, methods typed `::Array`). Other arguments are converted
  by juliacall (float -> Float64, int -> Int, tuple -> Tuple, None -> nothing, ...) and get no
  gradient. A Python list becomes a `PyList`, an `AbstractVector` but not a `Vector`, so a method
  typed `::Vector` fails with a MethodError: type it `::AbstractVector`, `collect` it in Julia, or
  pass `juliacall.convert(jl.Vector[jl.Float64], v)`.
- Outputs: arrays, numbers, or tuples of them. Arrays are copied into torch's memory (one memcpy,
  keeping Julia's column-major strides), so torch can never write into an array that Zygote's
  pullback still reads or into a Julia global; `copy_outputs=False` keeps views of Julia's memory
  instead. Lazy arrays (`Fill`, `Adjoint`, ...) are collected; a number becomes a 0-d tensor of its
  element type.
- Gradients: Zygote's `nothing`, for one argument or for all, becomes None. Lazy or structured
  tangents (`Fill`, `OneElement`, `Adjoint`, thunks) are projected onto their argument with
  `ChainRulesCore.ProjectTo` (its shape and element type) and made dense in Julia before crossing.
  When no input needs a gradient, forward calls the function without Zygote.
- Threads: Julia runs only on the main thread, which starts it; forward or backward on another
  thread raises `JuliaThreadError` instead of risking a hang (see `bridges.julia._threads`).

The Julia side is the package BridgesJL, shipped inside this package (`bridges/julia/BridgesJL`),
which juliapkg installs (with Zygote and ChainRulesCore) from `bridges/juliapkg.json` on first use.
`include_setup(path, module, name)` writes the setup code for a function in a Julia file of your
own; `julia_has_package(name)` says whether an optional Julia package is installed.
"""
from ._bridge import JuliaFunction, julia2pytorch
from ._code import include_setup
from ._runtime import (JULIA_PACKAGE, MIN_JULIA, JuliaUnavailableError, julia_has_package,
                       julia_unavailable_reason)
from ._threads import JuliaThreadError

__all__ = ["julia2pytorch", "JuliaFunction", "JuliaUnavailableError", "JuliaThreadError",
           "julia_unavailable_reason", "julia_has_package", "include_setup", "JULIA_PACKAGE",
           "MIN_JULIA"]
