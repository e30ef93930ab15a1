"""The OpenAPI document tells the truth: schemathesis against a live server (real socket), bounded cases.

Every documented route gets generated requests (valid and invalid); each response must not be a 5xx and
must match the documented status codes, content types and schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_helpers import server_process

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CASES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def live_url(tiny_model_dir: Path) -> Iterator[str]:
    with server_process(tiny_model_dir) as (url, _):
        yield url


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_responses_match_the_openapi_document(live_url: str, mode: GenerationMode) -> None:
    api = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/embed", "/reconstruct", "/classify", "/info", "/metrics"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # the GET routes take no input: there is nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=CASES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def conforms(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=live_url, checks=CHECKS)

        conforms()


def test_documented_models_and_content_types_hold_for_real_answers(live_url: str) -> None:
    """Real requests whose answers schemathesis is unlikely to generate (no patch removed), checked against
    the response models the document is made from, and /metrics against its documented media type."""
    import httpx
    from service_helpers import sample_png

    from service.schemas import ClassifyResponse, EmbedResponse, ReconstructResponse

    doc = httpx.get(f"{live_url}/openapi.json").json()
    image = {"image": sample_png()}
    for mask_ratio in ("0", "0.75"):
        r = httpx.post(f"{live_url}/reconstruct", files=image, data={"mask_ratio": mask_ratio,
                                                                     "response_format": "json"})
        body = ReconstructResponse.model_validate(r.json())
        assert (body.data[0].mse_masked is None) == (mask_ratio == "0")
    EmbedResponse.model_validate(httpx.post(f"{live_url}/embed", files=image).json())
    ClassifyResponse.model_validate(httpx.post(f"{live_url}/classify", files=image).json())
    metrics = httpx.get(f"{live_url}/metrics")
    documented = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(documented) == [metrics.headers["content-type"].split(";")[0]] == ["text/plain"]
