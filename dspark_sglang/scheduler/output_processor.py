"""Append accepted tokens to requests, checking every stop condition at every position.

A speculative step can hand a request several tokens at once; EOS, stop token ids, stop strings,
a terminated grammar and ``max_new_tokens`` are checked after *each* of them, and whatever
follows the stop is dropped (its KV is freed by the cache manager on release).
"""

from __future__ import annotations

from typing import Any

from dspark_sglang.core.req import Req


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def append_tokens(self, req: Req, tokens: list[int],
                      logprobs: list[tuple[Any, Any]] | None = None) -> int:
        """Append ``tokens`` one by one until the request finishes; returns how many were kept.

        Advances the live grammar matcher by exactly the kept tokens.
        """
        sp = req.sampling_params
        kept = 0
        for i, tok in enumerate(tokens):
            req.output_ids.append(tok)
            kept += 1
            if logprobs is not None:
                req.output_token_logprobs.append(logprobs[i][0])
                req.output_top_logprobs.append(logprobs[i][1])
            n_out = len(req.output_ids)
            if req.grammar is not None and not req.grammar.is_terminated():
                req.grammar.accept_token(tok)
            if tok in self.eos_token_ids and not sp.ignore_eos:
                req.finish_reason = {"type": "stop", "matched": tok}
            elif tok in sp.stop_token_ids:
                req.finish_reason = {"type": "stop", "matched": tok}
            elif req.grammar is not None and req.grammar.is_terminated():
                req.finish_reason = {"type": "stop", "matched": tok}
            elif sp.stop and self._check_stop_str(req):
                pass
            elif n_out >= sp.max_new_tokens:
                req.finish_reason = {"type": "length", "length": sp.max_new_tokens}
            if req.finish_reason is not None:
                break
        return kept

    def _check_stop_str(self, req: Req) -> bool:
        sp = req.sampling_params
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=sp.skip_special_tokens)
        longest = max(len(s) for s in sp.stop)
        # only look at the tail that can contain a newly completed stop string
        start = max(0, len(req.decoded_text) - longest)
        req.decoded_text = text
        best: tuple[int, str] | None = None
        for s in sp.stop:
            idx = text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        req.finish_reason = {"type": "stop", "matched": best[1]}
        return True

    def output_text(self, req: Req) -> str:
        """Completion text with a matched stop string (and what follows it) trimmed."""
        sp = req.sampling_params
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=sp.skip_special_tokens)
        fr = req.finish_reason
        if fr and fr.get("type") == "stop" and isinstance(fr.get("matched"), str) \
                and not sp.no_stop_trim:
            idx = text.find(fr["matched"])
            if idx != -1:
                text = text[:idx]
        return text

    def meta_info(self, req: Req) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": req.rid,
            "prompt_tokens": len(req.origin_input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "finish_reason": req.finish_reason,
            "spec_verify_ct": req.spec_verify_ct,
        }
        if req.spec_verify_ct:
            meta["spec_accept_length"] = len(req.output_ids) / req.spec_verify_ct
            meta["spec_accepted_drafts"] = req.spec_accepted_drafts
            meta["spec_draft_tokens"] = req.spec_draft_tokens
        if req.return_logprob:
            meta["input_token_logprobs"] = req.input_token_logprobs
            meta["output_token_logprobs"] = req.output_token_logprobs
            if req.top_logprobs_num:
                meta["input_top_logprobs"] = req.input_top_logprobs
                meta["output_top_logprobs"] = req.output_top_logprobs
        return meta
