"""
Steady single-phase flow in a rough fracture, in DPFEHM's style: two-point-flux finite volumes on
a regular grid of square cells, assembled as a sparse matrix and solved with `\\`.

`pressure(k, p_left, p_right)` is the same discrete operator as Python's `bridges.fracture`:
k[i, j] is the permeability of cell (row i, column j); interior faces have transmissibility
sqrt(k1 k2) (geometric mean), the left and right boundary faces 2k (half a cell), top and bottom
are closed. A ChainRulesCore rrule makes it Zygote-differentiable with one transposed solve.
Loaded by the setup code of `bridges.fracture.pressure_julia` (include + using .Fracture).
"""
module Fracture

using LinearAlgebra, SparseArrays
import ChainRulesCore
using ChainRulesCore: NoTangent, unthunk

export pressure

cellindex(ny) = (i, j) -> i + (j - 1) * ny # column-major numbering

"""A(k) (sparse, symmetric) and b(k) for `A p = b`."""
function assemble(k::AbstractMatrix{T}, p_left, p_right) where {T <: Real}
    ny, nx = size(k)
    id = cellindex(ny)
    I, J, V = Int[], Int[], T[]
    b = zeros(T, ny * nx)
    function connect!(c1, c2, t)
        append!(I, (c1, c2, c1, c2))
        append!(J, (c1, c2, c2, c1))
        append!(V, (t, t, -t, -t))
    end
    for j in 1:nx, i in 1:ny
        j < nx && connect!(id(i, j), id(i, j + 1), sqrt(k[i, j] * k[i, j + 1]))
        i < ny && connect!(id(i, j), id(i + 1, j), sqrt(k[i, j] * k[i + 1, j]))
    end
    for i in 1:ny
        l, r = id(i, 1), id(i, nx)
        push!(I, l)
        push!(J, l)
        push!(V, 2 * k[i, 1])
        b[l] += 2 * k[i, 1] * p_left
        push!(I, r)
        push!(J, r)
        push!(V, 2 * k[i, nx])
        b[r] += 2 * k[i, nx] * p_right
    end
    return sparse(I, J, V, ny * nx, ny * nx), b # sparse sums duplicate entries
end

checkpositive(k) = all(x -> isfinite(x) && x > 0, k) ||
    throw(ArgumentError(
        "Fracture.pressure: k must be finite and > 0 everywhere, min is $(minimum(k))",
    ))

"""Pressure field (ny, nx) for cell permeability k (ny, nx)."""
function pressure(k::AbstractMatrix{<:Real}, p_left::Real = 2.0, p_right::Real = 1.0)
    checkpositive(k)
    A, b = assemble(Array(k), p_left, p_right)
    return reshape(A \ b, size(k))
end

"""dL/dk = -(dr/dk)' lam for the residual r = A(k) p - b(k), written out face by face."""
function residual_vjp(k, p, lam, p_left, p_right)
    ny, nx = size(k)
    g = zero(k)
    function face!(c1, c2)
        t = sqrt(k[c1] * k[c2])
        s = (lam[c1] - lam[c2]) * (p[c1] - p[c2]) # lam' d(flux)/dt
        g[c1] -= s * t / (2 * k[c1])
        g[c2] -= s * t / (2 * k[c2])
    end
    for j in 1:nx, i in 1:ny
        c = CartesianIndex(i, j)
        j < nx && face!(c, CartesianIndex(i, j + 1))
        i < ny && face!(c, CartesianIndex(i + 1, j))
    end
    for i in 1:ny
        g[i, 1] -= 2 * lam[i, 1] * (p[i, 1] - p_left)
        g[i, nx] -= 2 * lam[i, nx] * (p[i, nx] - p_right)
    end
    return g
end

function ChainRulesCore.rrule(
    ::typeof(pressure),
    k::AbstractMatrix{<:Real},
    p_left::Real = 2.0,
    p_right::Real = 1.0,
)
    checkpositive(k)
    kk = Array(k)
    A, b = assemble(kk, p_left, p_right)
    F = lu(A) # UMFPACK; reused by the adjoint solve
    p = reshape(F \ b, size(kk))
    function pressure_pullback(dp)
        dp = unthunk(dp)
        lam = reshape(F' \ vec(Array(dp)), size(kk)) # one transposed solve
        return NoTangent(),
            residual_vjp(kk, p, lam, p_left, p_right),
            NoTangent(),
            NoTangent()
    end
    return p, pressure_pullback
end

end
