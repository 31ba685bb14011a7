"""The checked-in generated code must match what `make protos` produces now."""

from pathlib import Path

from services.protocol import pb
from services.protogen import PACKAGE_PREFIX, REPO_ROOT, generate


def test_generated_code_is_fresh(tmp_path):
    written = generate(tmp_path)
    assert written, "nothing generated"
    for path in written:
        checked_in = REPO_ROOT / PACKAGE_PREFIX / "tuneserve" / "v1" / path.name
        assert checked_in.exists(), f"{path.name} missing: run `make protos`"
        assert checked_in.read_bytes() == path.read_bytes(), \
            f"{path.name} is stale: run `make protos` and commit the result"


def test_public_names_exist_exactly():
    svc = pb.DESCRIPTOR.services_by_name["Inference"]
    assert {m.name for m in svc.methods} >= {"Classify", "Generate", "GenerateStream", "ListModels"}
    assert svc.methods_by_name["GenerateStream"].server_streaming
    fields = {name: [f.name for f in pb.DESCRIPTOR.message_types_by_name[name].fields]
              for name in ("ClassifyRequest", "ClassifyResponse", "Classification",
                           "LabelScore", "GenerateRequest", "GenerateResponse")}
    assert fields["ClassifyRequest"][:2] == ["model", "texts"]
    assert fields["ClassifyResponse"] == ["results", "model", "version"]
    assert fields["Classification"] == ["label", "score", "scores"]
    assert fields["LabelScore"] == ["label", "score"]
    assert fields["GenerateRequest"][:8] == ["model", "prompt", "max_new_tokens", "temperature",
                                             "top_p", "top_k", "stop", "seed"]
    assert fields["GenerateResponse"] == ["text", "prompt_tokens", "completion_tokens",
                                          "finish_reason", "model", "version"]
    assert pb.DESCRIPTOR.package == "tuneserve.v1"
    assert Path(REPO_ROOT / "protos" / "tuneserve" / "v1" / "inference.proto").is_file()
