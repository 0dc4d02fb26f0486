"""A small 2-D incompressible flow solver in torch whose pressure solve is PETSc's
(`bridges.petsc.solve`), for hybrid solver-in-the-loop training (seed 001).

    flow = Flow(32, viscosity=1e-3, dt=0.05)           # periodic MAC grid, PETSc CG + MG
    vel = restrict(random_flow(128, 4, seed=0), 4)     # (4, 2, 32, 32) face velocities
    states = flow.rollout(vel, 10)                     # differentiable, adjoint pressure solves
"""
from ._data import face_coordinates, random_flow, taylor_green
from ._mac import advection, curl, divergence, gradient, laplacian, restrict, vorticity
from ._pressure import OPTIONS, FFTPoisson, PetscPoisson
from ._solver import PRESSURE, Flow

__all__ = ["Flow", "PRESSURE", "PetscPoisson", "FFTPoisson", "OPTIONS", "random_flow",
           "taylor_green", "face_coordinates", "advection", "curl", "divergence", "gradient",
           "laplacian", "restrict", "vorticity"]
