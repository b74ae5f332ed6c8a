"""Stop conditions and incremental detokenization on the real tokenizer."""

from __future__ import annotations

import random

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.text_output import TextStream
from engine.tokenizer import IncrementalDetokenizer

UNICODE = "Café ☕ naïve — 你好，世界！ 🎉🧑‍🚀 Ελληνικά Привет"


def test_incremental_deltas_concatenate_to_full_decode(smol_llm: LLM) -> None:
    tokenizer = smol_llm.tokenizer
    ids = tokenizer.encode(UNICODE)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids) == UNICODE
    assert not any("\ufffd" in d for d in deltas), "no half characters are ever emitted"


def test_stop_string_cuts_text_and_holds_back_partial_matches(smol_llm: LLM) -> None:
    tokenizer = smol_llm.tokenizer
    stream = TextStream.for_request(tokenizer, [], stop=("world!",))
    pieces = [stream.add([t], finished=False) for t in tokenizer.encode("hello world! more")]
    assert stream.stopped and "".join(pieces) == "hello "


def test_generation_stops_on_stop_string(smol_llm: LLM) -> None:
    greedy = SamplingParams(max_tokens=40, temperature=0)
    full = smol_llm.generate(["The capital of France is"], greedy)[0]
    assert "Paris" in full.text
    cut = smol_llm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=40, temperature=0, stop=("aris",))
    )[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index("aris")]
    assert smol_llm.engine.block_manager.allocator.num_used == 0


def test_stop_token_ids_max_tokens_and_ignore_eos(smol_llm: LLM) -> None:
    chat = [{"role": "user", "content": "Say hi."}]
    natural = smol_llm.generate([chat], SamplingParams(max_tokens=60, temperature=0))[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == 2  # <|im_end|>
    forced = smol_llm.generate(
        [chat],
        SamplingParams(max_tokens=len(natural.token_ids) + 5, temperature=0, ignore_eos=True),
    )[0]
    assert forced.finish_reason == "length"
    assert forced.token_ids[: len(natural.token_ids)] == natural.token_ids
    stop_on = natural.token_ids[1]
    by_id = smol_llm.generate(
        [chat], SamplingParams(max_tokens=60, temperature=0, stop_token_ids=(stop_on,))
    )[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == natural.token_ids[:2]
    short = smol_llm.generate([chat], SamplingParams(max_tokens=3, temperature=0))[0]
    assert short.finish_reason == "length" and short.token_ids == natural.token_ids[:3]


class _WindowedOnly:
    """The tokenizer without its Rust backend: the detokenizer falls back to windows."""

    def __init__(self, tokenizer: object) -> None:
        self.decode = tokenizer.decode  # type: ignore[attr-defined]


def test_streamed_and_windowed_detokenizers_agree_on_random_ids(smol_llm: LLM) -> None:
    tokenizer = smol_llm.tokenizer
    rng = random.Random(5)
    for _ in range(150):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 8))]
        split = rng.randrange(len(ids) + 1)  # one delta of several tokens, then one by one
        texts = []
        for source in (tokenizer, _WindowedOnly(tokenizer)):
            detok = IncrementalDetokenizer.after_prompt(source, prompt, skip_special_tokens=True)
            pieces = [detok.add(ids[:split])] + [detok.add([t]) for t in ids[split:]]
            texts.append("".join(pieces) + detok.flush())
        assert texts[0] == texts[1]
        if not prompt:  # (a prompt's tail can end inside a character the output completes)
            assert texts[0] == tokenizer.decode(ids, skip_special_tokens=True)
