import pytest

from services.config import ServeLimits
from services.errors import InvalidInput
from services.protocol import pb
from services.serving.validation import validate_classify

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
