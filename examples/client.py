"""Sign in to the example app and stream a stage through its ``/llm`` mount::

    python client.py "Tell me a joke"

``EXAMPLE_URL`` (http://127.0.0.1:8000) and ``EXAMPLE_MODEL`` (smollm2) choose where to."""

import os
import sys
import uuid

import httpx

from stageserver.client import ChunkEvent, DoneEvent, StageClient

url = os.environ.get("EXAMPLE_URL", "http://127.0.0.1:8000")
login = httpx.post(f"{url}/login", json={"user": "alice", "password": "wonderland"})
token = login.raise_for_status().json()["token"]
with StageClient(f"{url}/llm", api_key=token) as client:
    prompt = " ".join(sys.argv[1:]) or "Say hello."
    model = os.environ.get("EXAMPLE_MODEL", "smollm2")
    for event in client.stream(
        stage_id=f"example-{uuid.uuid4()}", model_name=model, user_prompt=prompt
    ):
        if isinstance(event, ChunkEvent):
            print(event.text, end="", flush=True)
        elif not isinstance(event, DoneEvent):
            sys.exit(f"\nthe stage ended without an answer: {event}")
print()
