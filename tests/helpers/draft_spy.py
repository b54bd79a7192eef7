"""What a speculative-decoding test compares: every draft the engine proposed, with the tokens its request held then."""
from __future__ import annotations


def record_drafts(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Patch speculative decoding's step work (engine/spec/step_plugin.py) so that each step's drafts are also
    appended, as (the request's token ids when they were drafted, its drafts), to the list returned (filled as the
    engine runs)."""
    from moelink.engine.spec.step_plugin import _Drafts

    seen: list[tuple[list[int], list[int]]] = []
    collect = _Drafts.collect

    def spy(self, payload, out):
        collect(self, payload, out)
        seen.extend((list(st.all_token_ids), out.draft_token_ids[st.req_id]) for st in self.picked
                    if st.req_id in out.draft_token_ids)

    monkeypatch.setattr(_Drafts, "collect", spy)
    return seen
