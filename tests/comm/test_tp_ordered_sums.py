"""The TP group's sums in batch-invariant mode (engine/tp/group.py `ordered_sums`): at 3 ranks gloo's all-reduce adds
an element's partials in an order set by the element's position and the buffer's size (a ring's chunks), so the same
three partials sum to other bits elsewhere in another buffer, which is what a token's row meets as the batch
changes; the ordered sums give one answer everywhere, ((p0 + p1) + p2), the same on every rank."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.slow  # three gloo ranks: about 2 s
def test_ordered_sums_give_one_answer_where_the_all_reduce_gives_several(ep_launch):
    (results,) = ep_launch(dict(world_size=3, mode="tp_sums"))
    assert all(r == results[0] for r in results)  # every rank the same
    assert len(results[0]["plain"]) > 1  # the order moves with the position: the check can fail
    p0, p1, p2 = (torch.tensor(v, dtype=torch.float32) for v in (1.0, 1e-8, -1.0))
    assert results[0]["ordered"] == {float.hex(((p0 + p1) + p2).item())}  # rank order
