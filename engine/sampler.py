"""Turns logits into next tokens: repetition, presence and frequency penalties, temperature,
top-k, top-p, min-p, then greedy argmax or seeded sampling. Each seeded row draws only from
its own generator, so its tokens do not depend on what else is in the batch."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.sequence import Sequence, TokenLogprob


def apply_repetition_penalty(
    logits: torch.Tensor, token_ids: Seq[int], penalty: float
) -> torch.Tensor:
    """Hugging Face rule on one row: positive logits divided, negative multiplied."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def apply_output_penalties(
    logits: torch.Tensor, output_token_ids: Seq[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI rule on one row: ``logit[j] -= frequency * count[j] + presence * (count[j] > 0)``
    where ``count[j]`` is how often token j is in the output so far (the prompt does not
    count). A placeholder id (< 0, a token still on the device) counts for nothing."""
    ids = torch.tensor([t for t in output_token_ids if t >= 0], dtype=torch.long)
    if ids.numel() == 0:
        return logits
    counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.device, logits.dtype)
    logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def penalize(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row's logits (a copy) with the request's penalties applied."""
    params = seq.params
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        apply_repetition_penalty(logits, seq.token_ids, params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        apply_output_penalties(
            logits, seq.output_token_ids, params.presence_penalty, params.frequency_penalty
        )
    return logits


def truncate(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Masks (sets to -inf) tokens outside the top-k, the top-p nucleus and the min-p floor.
    logits: (vocab,) float32, already divided by the temperature."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draws from softmax(logits) by the exponential race: argmax(p / E), E ~ Exp(1). The
    noise comes from ``generator`` alone, which makes seeded rows batch-independent."""
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def draw_generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """A seeded request's n-th token draws from a generator seeded by (seed, n), so the draw
    is the same on whichever worker (prefill or decode) and in whichever batch it happens."""
    if seq.params.seed is None:
        return seq.generator
    mixed = (seq.params.seed * 0x9E3779B97F4A7C15 + len(seq.output_token_ids)) % (1 << 63)
    return torch.Generator(device=device).manual_seed(mixed)


def top_logprobs(logprobs: torch.Tensor, token_id: int, n: int) -> TokenLogprob:
    top = torch.topk(logprobs, n) if n > 0 else None
    alternatives = (
        tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        if top is not None
        else ()
    )
    return TokenLogprob(token_id, float(logprobs[token_id]), alternatives)


class Sampler:
    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> list[tuple[int, TokenLogprob | None]]:
        """logits: (num_seqs, vocab) -> a token id and optional logprobs per sequence."""
        logits = logits.float()
        needs_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = logits.log_softmax(-1) if needs_logprobs else None
        greedy = torch.argmax(logits, dim=-1).tolist()
        results = []
        for row, seq in enumerate(seqs):
            token_id = greedy[row]
            params = seq.params
            if params.has_penalties or not params.is_greedy:
                row_logits = penalize(logits[row], seq)
                if params.is_greedy:
                    token_id = int(row_logits.argmax())
                else:
                    row_logits = truncate(
                        row_logits / params.temperature, params.top_k, params.top_p, params.min_p
                    )
                    token_id = sample_row(row_logits, draw_generator(seq, logits.device))
            logprob = None
            if raw_logprobs is not None and params.logprobs is not None:
                logprob = top_logprobs(raw_logprobs[row], token_id, params.logprobs)
            results.append((token_id, logprob))
        return results
