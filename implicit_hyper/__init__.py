"""implicit_hyper: hyperparameter optimisation by implicit differentiation in JAX."""

from implicit_hyper._src.bilevel import Bilevel as Bilevel
from implicit_hyper._src.bilevel import BilevelMetrics as BilevelMetrics
from implicit_hyper._src.bilevel import BilevelState as BilevelState
from implicit_hyper._src.bilevel import bilevel as bilevel
from implicit_hyper._src.checkpoint import latest_checkpoint as latest_checkpoint
from implicit_hyper._src.checkpoint import load_checkpoint as load_checkpoint
from implicit_hyper._src.checkpoint import save_checkpoint as save_checkpoint
from implicit_hyper._src.fit import bilevel_batches as bilevel_batches
from implicit_hyper._src.fit import fit as fit
from implicit_hyper._src.hypergrad import hypergrad as hypergrad
from implicit_hyper._src.hypergrad import hypergrad_with_info as hypergrad_with_info
from implicit_hyper._src.implicit import implicit_argmin as implicit_argmin
from implicit_hyper._src.implicit import implicit_fixed_point as implicit_fixed_point
from implicit_hyper._src.implicit import implicit_root as implicit_root
from implicit_hyper._src.operators import hessian_vector_product as hessian_vector_product
from implicit_hyper._src.operators import mixed_vjp as mixed_vjp
from implicit_hyper._src.parallel import pmean_gradient as pmean_gradient
from implicit_hyper._src.solvers._base import LinearSolver as LinearSolver
from implicit_hyper._src.solvers._base import SolveInfo as SolveInfo
from implicit_hyper._src.solvers._base import solver_pytree as solver_pytree
from implicit_hyper._src.solvers.bicgstab import BiCGStab as BiCGStab
from implicit_hyper._src.solvers.cg import CG as CG
from implicit_hyper._src.solvers.direct import Direct as Direct
from implicit_hyper._src.solvers.function import FunctionSolver as FunctionSolver
from implicit_hyper._src.solvers.gmres import GMRES as GMRES
from implicit_hyper._src.solvers.identity import Identity as Identity
from implicit_hyper._src.solvers.minres import MINRES as MINRES
from implicit_hyper._src.solvers.neumann import Neumann as Neumann
from implicit_hyper._src.solvers.neumann import NeumannState as NeumannState
from implicit_hyper._src.solvers.normal_cg import NormalCG as NormalCG
from implicit_hyper._src.solvers.nystrom import Nystrom as Nystrom
from implicit_hyper._src.solvers.nystrom import NystromPreconditioner as NystromPreconditioner
from implicit_hyper._src.solvers.nystrom import NystromState as NystromState
from implicit_hyper._src.solvers.richardson import Richardson as Richardson
from implicit_hyper._src.spectral import RitzValues as RitzValues
from implicit_hyper._src.spectral import lanczos as lanczos
from implicit_hyper._src.spectral import max_eigenvalue as max_eigenvalue
from implicit_hyper._src.stochastic import amigo as amigo
from implicit_hyper._src.stochastic import soba as soba
from implicit_hyper._src.trust import HypergradientError as HypergradientError
from implicit_hyper._src.trust import HypergradientWarning as HypergradientWarning
from implicit_hyper._src.trust import SolveRecord as SolveRecord
from implicit_hyper._src.trust import record_solves as record_solves
from implicit_hyper._src.unrolled import unrolled_hypergrad as unrolled_hypergrad

__version__ = "0.2.0.dev0"
