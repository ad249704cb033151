"""Linear solvers, one per file; each returns ``(x, SolveInfo)``."""
