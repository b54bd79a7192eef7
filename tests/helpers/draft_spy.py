"""What a speculative-decoding test compares: every draft the engine proposed, with the tokens its request held then."""
from __future__ import annotations


def record_drafts(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Patch the step handle so that each step's drafts are also appended, as (the request's token ids when they
    were drafted, its drafts), to the list returned (filled as the engine runs)."""
    from moelink.engine.rank.step_handle import StepHandle

    seen: list[tuple[list[int], list[int]]] = []
    collect = StepHandle._draft

    def spy(self, out, drafts_RK):
        collect(self, out, drafts_RK)
        seen.extend((list(st.all_token_ids), out.draft_token_ids[st.req_id]) for st in self.states
                    if st.req_id in out.draft_token_ids)

    monkeypatch.setattr(StepHandle, "_draft", spy)
    return seen
