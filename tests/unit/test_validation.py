import pytest

from services.core.config import ServeLimits
from services.core.errors import InvalidInput
from services.protocol import pb
from services.serving.validation import validate_classify, validate_generate

LIMITS = ServeLimits(max_texts_per_request=3, max_text_chars=20)


def test_valid_request():
    call = validate_classify(pb.ClassifyRequest(model="m", texts=["a", "é ✓"], version="v2"),
                             LIMITS)
    assert call.model == "m" and call.texts == ["a", "é ✓"] and call.version == "v2"


@pytest.mark.parametrize("kw,needle", [
    (dict(model="", texts=["a"]), "model: required"),
    (dict(model="../etc", texts=["a"]), "model: invalid model name"),
    (dict(model="m", texts=[]), "texts: at least one"),
    (dict(model="m", texts=["a"] * 4), "texts: 4 texts; the limit is 3"),
    (dict(model="m", texts=["a", "  "]), "texts[1]: empty"),
    (dict(model="m", texts=["x" * 21]), "texts[0]: 21 characters; the limit is 20"),
    (dict(model="m", texts=["a\x00b"]), "texts[0]: contains a NUL"),
    (dict(model="m", texts=["a"], version="latest"), "version: invalid version"),
])
def test_invalid_requests_name_the_field(kw, needle):
    with pytest.raises(InvalidInput) as err:
        validate_classify(pb.ClassifyRequest(**kw), LIMITS)
    assert needle in str(err.value)


def gen_request(**kw):
    return pb.GenerateRequest(**{"model": "m", "prompt": "hello", **kw})


def test_valid_generate_request_and_defaults():
    call = validate_generate(gen_request(), LIMITS)
    assert call.model == "m" and call.prompt == "hello" and call.version is None
    assert call.params == {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0,
                           "top_k": 0, "stop": [], "seed": 0, "ignore_eos": False}
    call = validate_generate(gen_request(max_new_tokens=7, temperature=0.5, top_p=0.5,
                                         top_k=3, stop=["\n", "##"], seed=2**63,
                                         ignore_eos=True, version="v3"), LIMITS)
    assert call.params["max_new_tokens"] == 7 and call.params["stop"] == ["\n", "##"]
    assert call.params["seed"] == 2**63 and call.version == "v3"
    assert validate_generate(gen_request(top_p=1.0), LIMITS).params["top_p"] == 1.0


@pytest.mark.parametrize("kw,needle", [
    (dict(prompt=""), "prompt: required"),
    (dict(prompt="x" * 20_001), "prompt: 20001 characters; the limit is 20000"),
    (dict(prompt="a\x00"), "prompt: contains a NUL"),
    (dict(max_new_tokens=0), "max_new_tokens: must be at least 1"),
    (dict(max_new_tokens=1025), "max_new_tokens: 1025; the limit is 1024"),
    (dict(temperature=-1.0), "temperature: must be >= 0 (0 means greedy), got -1.0"),
    (dict(temperature=float("inf")), "temperature: must be a finite number"),
    (dict(top_p=0.0), "top_p: must be in (0, 1]"),
    (dict(top_p=1.01), "top_p: must be in (0, 1], got 1.01"),
    (dict(top_p=1.0000001), "top_p: must be in (0, 1], got 1.0000001"),  # not "1"
    (dict(top_p=float("nan")), "top_p: must be a finite number"),
    (dict(top_k=-3), "top_k: must be >= 0"),
    (dict(stop=["a"] * 5), "stop: 5 strings; the limit is 4"),
    (dict(stop=["a", ""]), "stop[1]: empty"),
    (dict(stop=["y" * 65]), "stop[0]: 65 characters; the limit is 64"),
    (dict(version="7"), "version: invalid version"),
    (dict(model="a/b"), "model: invalid model name"),
])
def test_invalid_generate_requests_name_the_field(kw, needle):
    with pytest.raises(InvalidInput) as err:
        validate_generate(gen_request(**kw), LIMITS)
    assert needle in str(err.value)
