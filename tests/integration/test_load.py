"""Concurrent load with real clients: ab, as the spec's load check runs it, and the openai
async client; every accepted request gets an answer, none is lost."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("ab") is None, reason="ab (apache2-utils) is not installed; `make test` installs it")
def test_ab_spec_load_all_answered(base_url: str, tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"prompt": "Performance test", "max_tokens": 20}))
    result = subprocess.run(
        ["ab", "-n", "400", "-c", "50", "-s", "60", "-T", "application/json", "-p", str(payload),
         base_url + "/v1/completions"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"Complete requests:\s+400", out), out
    assert "Non-2xx responses" not in out, out
    # ab counts differing body lengths as "failed"; only exceptions and connect errors matter here
    assert re.search(r"\(Connect: 0, Receive: 0, Length: \d+, Exceptions: 0\)|Failed requests:\s+0", out), out


async def test_concurrent_openai_clients_all_answered(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    async def one(i: int) -> int:
        if i % 3 == 0:
            stream = await client.completions.create(model="phi-3-mini", prompt=f"n{i}", max_tokens=8,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            assert chunks[-2].choices[0].finish_reason == "length"
            assert chunks[-1].usage is not None
            return chunks[-1].usage.completion_tokens
        result = await client.completions.create(model="phi-3-mini", prompt=f"n{i}", max_tokens=8,
                                                 extra_body={"ignore_eos": True})
        assert result.usage is not None
        return result.usage.completion_tokens

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(60))), 120)
    assert results == [8] * 60
    await client.close()
