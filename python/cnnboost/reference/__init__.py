"""Pure-torch reference modules: the same constructors, parameter names and results
as the fast modules, computed the straightforward way. The tests compare against
them; they are also a readable statement of what each module computes."""

from .ab import AB
from .afi import AFI
from .ffc import FFC, vote_scores
from .ssm import SSM

__all__ = ["AB", "AFI", "FFC", "SSM", "vote_scores"]
