"""Stage gates as library code: G1 (correlation gate) in `g1`. Protocols: ../shared/design/GATES.md."""

from .g1 import G1Protocol, G1Result, check_disjoint, g1_statistics, gate_flags, run_gate, split_questions, verdict

__all__ = ["G1Protocol", "G1Result", "check_disjoint", "g1_statistics", "gate_flags", "run_gate", "split_questions",
           "verdict"]
