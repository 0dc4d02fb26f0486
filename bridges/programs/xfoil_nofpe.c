/* Preloaded into Debian's xfoil: gfortran's runtime calls _gfortran_set_fpe at start-up to enable
   the floating-point traps the program was compiled with (-ffpe-trap); doing nothing here leaves
   IEEE default arithmetic (no traps), as in XFOIL's other builds. */
void _gfortran_set_fpe(int traps) { (void)traps; }
