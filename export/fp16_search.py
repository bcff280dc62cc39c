"""How the units that earned FP16 alone are brought within the budget together: given back
(the costliest per FLOP first, at full size the units that grow with the image first, several
at a time), then, at full size, tried again where the search may have given back too many.
export/fp16_plan.py decides what is measured; this decides what goes back."""

import math

from trufor_trt.export.measure import OUTPUTS
from trufor_trt.precision.budgets import FP16_BUDGET

NOISEPRINT = "noiseprint++"
ATTENTION = "attention scores"
# A full-size trial costs minutes; on the seed-0 plans a second try never held (suite: the
# first held; all 54 images as calibration: 1 of 2 images' first tries held, no second).
TAKE_BACK_TRIES = 1


def grows_with_the_image(unit_name: str) -> bool:
    """Units whose deviation grows with the image size: the attention of the streams and of the
    fusion (more tokens per softmax). Measured on the seed-0 checkpoint at 1536x2048: the
    encoder blocks in FP16 moved the map by 1.8e-2 (half the budget on 256 px crops)."""
    return unit_name.startswith(("rgb stream", "noiseprint stream", "fusion"))


def binding_output(errors: dict) -> str:
    """The output that uses the largest share of its FP16 budget."""
    return max((name for name in OUTPUTS if name in errors), key=lambda name: errors[name] / FP16_BUDGET[name])


def moves_the_output(unit_name: str, output: str) -> bool:
    """Whether giving `unit_name` back can lower the deviation of `output`: Noiseprint++ is the
    network's first part, so nothing after it moves np++."""
    return output != "np++" or unit_name.startswith(NOISEPRINT)


def give_back_until_within(earned: dict, cost: dict, share_of, limit: float, decisions: dict, reason: str,
                           on_step, full_size: bool = False) -> list:
    """Give back (noted in `decisions[name]["decision"]`) the earned units with the highest
    budget cost per FLOP until `share_of(earned, limit)` -> (the share of the budget they use
    together, the output using the most of it, or "") is at most `limit`; only units that can
    move that output are candidates. `earned`: unit name -> what `share_of` needs. On a
    full-size image (a trial costs minutes) the units whose deviation grows with the image go
    first, attention first, as many at once as the excess suggests. Returns the steps, each
    the units it gave back (name -> their `earned` value)."""
    steps = []
    while earned:
        on_step(f"measuring {len(earned)} units together ({reason})")
        share, output = share_of(earned, limit)
        on_step(f"  {share:.0%} of the budget" + (f" ({output})" if output else ""))
        if share <= limit:
            break
        pool = [name for name in earned if moves_the_output(name, output)] or list(earned)
        growing = [name for name in pool if full_size and grows_with_the_image(name)]
        count = max(1, math.ceil(len(growing) * (1 - limit / share))) if growing else 1
        order = sorted(pool, key=lambda name: (name not in growing, not name.endswith(ATTENTION), -cost[name]))
        steps.append({name: earned.pop(name) for name in order[:count]})
        for name in steps[-1]:
            decisions[name]["decision"] = (f"given back: the units together used {share:.0%} of the budget "
                                           f"{reason}")
    return steps


def take_back(earned: dict, steps: list, share_of, limit: float, decisions: dict, reason: str, on_step,
              tries: int = TAKE_BACK_TRIES) -> None:
    """At full size units go back several at a time, in an order measured on the crops, and near
    the budget a deviation follows the float32 noise as much as the units: the search may give
    back more than it needed. So up to `tries` of the units `steps` gave back (the
    give-back's steps: name -> `earned` value), the most FLOPs first, are tried again with the
    earned units and kept where they stay within `limit` together; a unit whose going alone
    brought the units within (the last step, if of one unit) was needed and is not tried."""
    needed = steps[-1] if steps and len(steps[-1]) == 1 else {}
    returned = {name: value for step in steps for name, value in step.items() if name not in needed}
    for name in sorted(returned, key=lambda name: -decisions[name]["gflop_at_512"])[:tries]:
        earned[name] = returned[name]
        on_step(f"taking {name} back ({reason})")
        share, _ = share_of(earned, limit)
        on_step(f"  {share:.0%} of the budget")
        if share <= limit:
            decisions[name]["decision"] = "fp16"
            decisions[name]["taken_back"] = f"{reason}: the units together used {share:.0%} of the budget"
        else:
            del earned[name]
