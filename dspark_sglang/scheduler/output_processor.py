"""Append accepted tokens to requests, checking every stop condition at every position.

A speculative step can hand a request several tokens at once; EOS, stop token ids, stop strings,
stop regexes, a terminated grammar, a grammar dead end and ``max_new_tokens`` are checked at
*each* of them, and whatever follows the stop is dropped (its KV is freed by the cache manager on
release).

Detokenization is incremental: each request keeps an ``IncrementalDecoder`` and
``Req.decoded_text`` grows by the newly completed characters only (a character split over several
byte tokens appears when its last byte arrives), so the output is never re-decoded from the start.
``decoded_text`` equals ``tokenizer.decode(output_ids)`` once the request is finished.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from dspark_sglang.core.req import Req


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def grammar_dead_end(num_output_tokens: int, token: int) -> dict[str, Any]:
    """The finish reason of a request whose grammar allows no further token (SGLang aborts a
    request whose grammar refuses a sampled token in the same way)."""
    return {"type": "abort", "status_code": 400, "message": (
        f"grammar dead end: the grammar allows no token after {num_output_tokens} output "
        f"tokens and is not complete (token {token} refused)")}


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def append_tokens(self, req: Req, tokens: list[int],
                      logprobs: list[tuple[Any, Any]] | None = None) -> int:
        """Append ``tokens`` one by one until the request finishes; returns how many were kept.

        Advances the live grammar matcher and the request's detokenizer by exactly the kept
        tokens. A token the live grammar refuses is not kept and ends the request with
        :func:`grammar_dead_end`: with every row masked, only a grammar dead end (a state that
        allows no token, left unmasked by ``adjust_logits_``) lets one through.
        """
        sp = req.sampling_params
        if req.detokenizer is None:
            req.detokenizer = self.tokenizer.incremental_decoder(sp.skip_special_tokens)
        kept = 0
        for i, tok in enumerate(tokens):
            g = req.grammar
            if g is not None and not g.is_terminated() and not g.accept_token(tok):
                req.finish_reason = grammar_dead_end(len(req.output_ids), tok)
                req.decoded_text += req.detokenizer.finish()
                break
            req.output_ids.append(tok)
            kept += 1
            if logprobs is not None:
                req.output_token_logprobs.append(logprobs[i][0])
                req.output_top_logprobs.append(logprobs[i][1])
            prev_len = len(req.decoded_text)
            req.decoded_text += req.detokenizer.step((tok,))
            n_out = len(req.output_ids)
            if tok in self.eos_token_ids and not sp.ignore_eos:
                req.finish_reason = {"type": "stop", "matched": tok}
            elif tok in sp.stop_token_ids:
                req.finish_reason = {"type": "stop", "matched": tok}
            elif req.grammar is not None and req.grammar.is_terminated():
                req.finish_reason = {"type": "stop", "matched": tok}
            elif len(req.decoded_text) > prev_len and (
                    (sp.stop and self._check_stop_str(req, prev_len))
                    or (sp.stop_regex and self._check_stop_regex(req))):
                pass
            elif n_out >= sp.max_new_tokens:
                req.finish_reason = {"type": "length", "length": sp.max_new_tokens}
            if req.finish_reason is not None:
                req.decoded_text += req.detokenizer.finish()
                break
        return kept

    def _check_stop_str(self, req: Req, prev_len: int) -> bool:
        """A stop string that ends in the text added by the last token (earliest start wins)."""
        sp = req.sampling_params
        text = req.decoded_text
        start = max(0, prev_len - max(len(s) for s in sp.stop) + 1)
        best: tuple[int, str] | None = None
        for s in sp.stop:
            idx = text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        req.stop_offset = best[0]
        req.finish_reason = {"type": "stop", "matched": best[1]}
        return True

    def _check_stop_regex(self, req: Req) -> bool:
        """The first pattern with a match in the text so far (searched whole, so anchors and
        lookarounds behave as on the final text); ``matched`` is the pattern, as in SGLang."""
        patterns = req.sampling_params.stop_regex
        for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
            m = _compiled(pattern).search(req.decoded_text)
            if m is not None:
                req.stop_offset = m.start()
                req.finish_reason = {"type": "stop", "matched": pattern}
                return True
        return False

    def output_text(self, req: Req) -> str:
        """Completion text so far with a matched stop string / regex match (and what follows it)
        trimmed unless ``no_stop_trim``."""
        text = req.decoded_text
        if req.stop_offset is not None and not req.sampling_params.no_stop_trim:
            text = text[:req.stop_offset]
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
