import pytest

from llmos.engine.detokenizer import IncrementalDetokenizer, StopChecker

TEXTS = [
    "Héllo wörld! naïve café, façade, Ærøskøbing.",
    "你好，世界！这是一个测试。日本語のテキストも。한국어 문장.",
    "Party 🎉🚀 time 👨\u200d👩\u200d👧 family 🇫🇷 flag 👍🏽",
    "  leading spaces\n\n\ttabs and\r\nnewlines   trailing   ",
    "mixed: Привет 世界 🎉 ñ\n  ok",
]


@pytest.fixture(scope="module")
def tokenizer(loaded_default):
    """The real byte-level BPE tokenizer of the default model, as llmos builds it."""
    return loaded_default.tokenizer


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    return [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_never_splits_a_character(tokenizer, text, chunk):
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream(detok, ids, chunk)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detok.text == text


def test_split_characters_exist_in_these_texts(tokenizer):
    """The texts above really do put parts of one character in different tokens."""
    ids = encode(tokenizer, TEXTS[2])
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_stream_after_a_prompt(tokenizer):
    prompt = encode(tokenizer, "Say something in Chinese: 你")
    output = encode(tokenizer, "好！ 世界 🎉 done")
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt), output)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(output)


def test_special_tokens_skipped_or_kept(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    ids = encode(tokenizer, "Hi there") + [eos]
    assert "".join(stream(IncrementalDetokenizer(tokenizer), ids)) == "Hi there"
    kept = "".join(stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=False), ids))
    assert kept == "Hi there" + tokenizer.id_to_token(eos)


def test_invalid_bytes_are_emitted_not_lost(tokenizer):
    emoji = encode(tokenizer, "🎉")
    broken = emoji[:-1]                                    # an emoji cut short
    assert tokenizer.decode(broken).endswith("\ufffd")

    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([t]) for t in broken] == [""] * len(broken)
    assert detok.flush() == tokenizer.decode(broken)

    ids = broken * 6 + encode(tokenizer, " and on")        # garbage the model never completes
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([t]) for t in ids]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert "".join(deltas[:-3]).count("\ufffd") > 0          # emitted before text resumed

    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([t]) for t in broken * 6]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(broken * 6)


def test_decodes_only_a_short_window(tokenizer):
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = Counting()
    ids = encode(tokenizer, " ".join(TEXTS) * 10)
    assert len(ids) > 500
    detok = IncrementalDetokenizer(counting, prompt_token_ids=ids[:50])
    assert "".join(stream(detok, ids)) == tokenizer.decode(ids)
    assert counting.longest <= 12


def feed_all(checker: StopChecker, deltas: list[str]) -> tuple[str, str | None]:
    out = []
    for delta in deltas:
        text, match = checker.feed(delta)
        out.append(text)
        if match is not None:
            return "".join(out), match
    return "".join(out) + checker.flush(), None


def test_stop_string_split_across_deltas_never_leaks():
    checker = StopChecker(["###END"])
    emitted = []
    for delta in ["Hello #", "#", "#E", "N", "D tail"]:
        text, match = checker.feed(delta)
        emitted.append(text)
        assert "#" not in text
    assert emitted == ["Hello ", "", "", "", ""]
    assert match == "###END"


def test_earliest_stop_string_wins():
    assert feed_all(StopChecker(["world", "lo"]), ["hello world"]) == ("hel", "lo")
    assert feed_all(StopChecker(["c", "ab"]), ["xa", "bc"]) == ("x", "ab")


def test_prefix_that_is_not_a_stop_string_is_released():
    checker = StopChecker(["</answer>"])
    assert checker.feed("a </ans") == ("a ", None)
    assert checker.feed("wering") == ("</answering", None)
    assert checker.feed(" <") == (" ", None)
    assert checker.flush() == "<"
    assert checker.flush() == ""


def test_include_stop_str_in_output():
    assert feed_all(StopChecker(["STOP"], include_stop_str_in_output=True), ["go ST", "OP now"]) == ("go STOP", "STOP")
    assert feed_all(StopChecker(["STOP"]), ["go ST", "OP now"]) == ("go ", "STOP")


def test_no_stop_strings_passes_text_through():
    checker = StopChecker([])
    assert checker.feed("anything") == ("anything", None)
    assert checker.flush() == ""


def test_flush_releases_held_text_at_the_end():
    assert feed_all(StopChecker(["\n\nUser:"]), ["answer", "\n", "\nUse"]) == ("answer\n\nUse", None)


def test_sentencepiece_style_leading_space_and_byte_fallback():
    """Decoders that drop the first token's leading space (Llama's SentencePiece) still stream right."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4, "<0xE4>": 5, "<0xBD>": 6, "<0xA0>": 7, "▁you": 8}
    sp = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    assert sp.decode([2]) == "world" and sp.decode(ids) == "Hello world! 你 you"
    deltas = stream(IncrementalDetokenizer(sp), ids)
    assert deltas == ["Hello", " world", "!", " ", "", "", "你", " you", ""]
    assert stream(IncrementalDetokenizer(sp, prompt_token_ids=[1]), [2, 3]) == [" world", "!", ""]
