"""
Julia-side helpers of the Python package `bridges` (its adapter `bridges.julia2pytorch`).

`pullback(f, args...)` runs Zygote and hands Python what crosses back cheaply: outputs that numpy
can view without copying, and a closure that turns output cotangents into dense input gradients.
`call(f, args...)` is the same forward without Zygote, for calls where no input needs a gradient.
Nothing is kept in globals, so a pullback is freed as soon as Python drops it.

Python copies every array it receives from here into its own memory unless the user asked for
views (`julia2pytorch(..., copy_outputs=false)`): an output may be an array Zygote's pullback still
reads (`tanh.(x)` keeps its result) or a global, and torch must not be able to write into either.
"""
module BridgesJL

import Zygote
using ChainRulesCore: AbstractZero, ProjectTo, unthunk

"""
    pullback(f, args...) -> (outputs, back)

`outputs` is `f(args...)` ready for Python (see `to_python`).

`back(dy, wanted)` takes the output cotangent (a tuple of them for a tuple output; a 0-dimensional
array for a number; `nothing` for zero) and one Bool per argument. It returns `nothing` when Zygote
finds no gradient at all, otherwise a tuple with, per argument, `nothing` (not wanted, not an array,
or no gradient) or a dense `Array` of the argument's size and element type.
"""
function pullback(f, args...)
    y, back = Zygote.pullback(f, args...)
    function vjp(dy, wanted::Tuple)
        grads = back(seed(y, dy))
        grads === nothing && return nothing
        return map(args, grads, wanted) do x, dx, w
            w && x isa AbstractArray && dx !== nothing ?
                dense(ProjectTo(x)(unthunk(dx))) :
                nothing
        end
    end
    return to_python(y), vjp
end

"""
    call(f, args...) -> outputs

`f(args...)` ready for Python, without Zygote: nothing is recorded for a backward pass.
"""
call(f, args...) = to_python(f(args...))

"""The op's name as Python shows it: a function's name, or the type of another callable."""
label(f) = string(f isa Function ? nameof(f) : typeof(f))

"""
Outputs for Python: strided arrays as they are (numpy views them through the array interface),
other arrays (`Fill`, `Adjoint`, a `PyArray` passed through, ...) collected into an `Array`,
numbers as 0-dimensional arrays (a Python float would lose a Float32), tuples element by element.
"""
to_python(y::Tuple) = map(to_python, y)
to_python(y::Number) = fill(y)
to_python(y::StridedArray) = y
to_python(y::AbstractArray) = Array(y)
to_python(y) = y

# Zygote seeds an output with a cotangent of the same structure: a number for a number
seed(y, dy) = dy
seed(y::Number, dy) = dy === nothing ? nothing : dy[]
seed(y::Integer, dy) = nothing # integer outputs have no tangent
seed(y::AbstractArray{<:Integer}, dy) = nothing
seed(y::Tuple, dy::Tuple) = map(seed, y, dy)

dense(dx::Array) = dx
dense(dx::AbstractArray) = Array(dx)
dense(::AbstractZero) = nothing
dense(dx) = throw(ArgumentError(
    "BridgesJL: Zygote returned a gradient of type $(typeof(dx)) " *
        "for an array argument, which cannot be made a dense array",
))

end
