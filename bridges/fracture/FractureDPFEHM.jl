"""
The fracture problem of `bridges.fracture` solved by DPFEHM's steady-state groundwater solver
(`DPFEHM.groundwater_steadystate`, algebraic multigrid, with DPFEHM's own ChainRulesCore rrule:
one multigrid solve with the transposed matrix per gradient).

DPFEHM works on a graph: nodes with heads, edges with conductance `Ks[e] * areasoverlengths[e]`,
and Dirichlet nodes whose head is fixed. Python (`bridges.fracture._dpfehm.grid_edges`) builds the
graph of the cell grid and passes its edges: nodes 1..ny*nx are the cells in column-major order,
then ny ghost nodes held at `p_left` and ny held at `p_right`. An edge between two cells stands for
an interior face (conductance sqrt(k1 k2)), an edge from a cell to a ghost for a boundary face half
a cell away (conductance 2k), as in Python's operator. Loaded by the setup code of
`bridges.fracture.pressure_dpfehm` (include + using .FractureDPFEHM).
"""
module FractureDPFEHM

import DPFEHM
import ChainRulesCore
using ChainRulesCore: NoTangent, unthunk

export pressure

"""
    conductances(k, a, b) -> Ks

Per edge e: sqrt(k[a[e]] * k[b[e]]) between two cells, 2 k[a[e]] from cell a[e] to a ghost node
(b[e] > length(k)). `k` is indexed linearly, column-major.
"""
function conductances(k::AbstractMatrix{T}, a, b) where {T <: Real}
    n = length(k)
    return [b[e] <= n ? sqrt(k[a[e]] * k[b[e]]) : 2 * k[a[e]] for e in eachindex(a)]
end

function ChainRulesCore.rrule(::typeof(conductances), k::AbstractMatrix{<:Real}, a, b)
    kk = Array(k)
    Ks = conductances(kk, a, b)
    function conductances_pullback(dKs)
        dKs = unthunk(dKs)
        dk = zero(kk)
        n = length(kk)
        for e in eachindex(a)
            if b[e] <= n
                # d sqrt(k1 k2) / dk1 = sqrt(k1 k2) / (2 k1)
                dk[a[e]] += dKs[e] * Ks[e] / (2 * kk[a[e]])
                dk[b[e]] += dKs[e] * Ks[e] / (2 * kk[b[e]])
            else
                dk[a[e]] += 2 * dKs[e]
            end
        end
        return NoTangent(), dk, NoTangent(), NoTangent()
    end
    return Ks, conductances_pullback
end

"""
    pressure(k, edges, p_left, p_right, reltol, maxiter) -> p

Pressure (ny, nx) for cell permeability k (ny, nx). `edges` is an (E, 2) integer matrix of node
pairs (1-based, as above). `reltol` and `maxiter` go to DPFEHM's algebraic multigrid solves, the
forward one and the transposed one of the rrule.
"""
function pressure(
    k::AbstractMatrix{<:Real},
    edges::AbstractMatrix{<:Integer},
    p_left::Real,
    p_right::Real,
    reltol::Real,
    maxiter::Integer,
)
    ny, nx = size(k)
    n = ny * nx
    a,
        b,
        neighbors,
        areasoverlengths,
        dirichletnodes,
        dirichleths,
        Qs = ChainRulesCore.@ignore_derivatives graph(edges, ny, n, p_left, p_right)
    Ks = conductances(k, a, b)
    h = DPFEHM.groundwater_steadystate(
        Ks,
        neighbors,
        areasoverlengths,
        dirichletnodes,
        dirichleths,
        Qs;
        reltol = reltol,
        maxiter = maxiter,
    )
    return cells(h, ny, nx)
end

"""The cells' heads of all nodes' heads `h`, as an (ny, nx) matrix."""
cells(h, ny, nx) = reshape(h[1:ny * nx], ny, nx)

# Hands DPFEHM's pullback a dense vector: it indexes its cotangent directly, and the generic
# getindex rule could pass it a thunk
function ChainRulesCore.rrule(::typeof(cells), h, ny, nx)
    function cells_pullback(dp)
        dh = zeros(eltype(h), length(h))
        dh[1:ny * nx] .= vec(unthunk(dp))
        return NoTangent(), dh, NoTangent(), NoTangent()
    end
    return cells(h, ny, nx), cells_pullback
end

"""DPFEHM's inputs for the graph: edge ends, neighbor pairs, unit area/length, the ghost nodes
(left ones first) with their heads, no sources."""
function graph(edges, ny, n, p_left, p_right)
    a, b = Vector{Int}(edges[:, 1]), Vector{Int}(edges[:, 2])
    nodes = n + 2 * ny
    dirichleths = zeros(nodes)
    dirichleths[n + 1:n + ny] .= p_left
    dirichleths[n + ny + 1:nodes] .= p_right
    return a,
        b,
        map(Pair, a, b),
        ones(length(a)),
        collect(n + 1:nodes),
        dirichleths,
        zeros(nodes)
end

end
